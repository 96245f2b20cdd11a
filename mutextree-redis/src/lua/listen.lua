-- Records that a backend listens for releases: subscribed to the
-- namespace's channel, confirmed. Releases publish for ARGV[1] ms from now;
-- the backend says so again well before that while it listens.
-- Returns 1.
redis.call('HSET', locks, LISTENED, string.format('%d', now + tonumber(ARGV[1]) * 1000))
return 1
