-- Sets the remaining life of exactly one grant to ttl.
-- ARGV: node key, owner, token, ttl ms. Returns 1, or 0 if not live.
local node, owner, token, ttl = ARGV[1], ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
local lock = live(node)
if not lock or lock.owner ~= owner or lock.token ~= token then
  return 0
end
local deadline = now + ttl * 1000
redis.call('HSET', locks, node, encode(deadline, lock.token, lock.state, lock.nonce, lock.owner))
redis.call('ZADD', expiry, deadline, node)
return 1
