-- Releases exactly one grant and announces it to waiters.
-- ARGV: node key, owner, token, channel. Returns 1, or 0 if not live.
local node, owner, token, channel = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4]
local lock = live(node)
if not lock or lock.owner ~= owner or lock.token ~= token then
  return 0
end
forget(node)
redis.call('PUBLISH', channel, node)
return 1
