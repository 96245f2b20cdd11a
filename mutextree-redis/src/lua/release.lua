-- Releases exactly one grant and announces it to waiters.
-- ARGV: node key, owner, token, channel, nonce (this release request's).
-- Returns 1, or 0 if not live.
local node, owner, token, channel, nonce = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4], ARGV[5]
local values = redis.call('HMGET', locks, node, LISTENED)
local value = values[1]
local lock = value and decode(node, value)
if not lock or lock.deadline <= now or lock.owner ~= owner or lock.token ~= token then
  return 0
end
if lock.state == RELEASED then
  -- Released already: by this same request, sent again after its reply
  -- was lost (1), or by an earlier one (0).
  return lock.nonce == nonce and 1 or 0
end
-- Kept, marked released by this request, out of the index, for a few
-- seconds at most. Its entry in the expiry set keeps the lock's deadline
-- (one write less): every script treats the marker as gone after `until_`,
-- and the sweep removes it after that deadline.
local until_ = math.min(lock.deadline, now + REMEMBER_RELEASE)
redis.call('HSET', locks, node, encode(until_, lock.token, RELEASED, nonce, lock.owner))
redis.call('ZREM', index, node)
-- Redis writes a message to every subscribed connection: only while a
-- backend has said it listens (see listen.lua).
if values[2] and tonumber(values[2]) > now then
  redis.call('PUBLISH', channel, node)
end
return 1
