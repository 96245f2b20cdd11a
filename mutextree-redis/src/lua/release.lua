-- Releases every item of exactly one grant and announces it to waiters.
-- ARGV: channel, nonce (this release request's), owner, token, then each
-- item's key and mode. Returns 1, or 0 (changing nothing) if not live.
local channel, nonce, owner, token = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4])
local items = read_items(5)
local fields = {}
for i, item in ipairs(items) do
  fields[i] = item_field(item.key, item.mode, token)
end
-- Read with the items: whether anyone listens.
fields[#items + 1] = LISTENED
local values = redis.call('HMGET', locks, unpack(fields))
local entries, by_this, by_other = {}, 0, 0
for i = 1, #items do
  local field = fields[i]
  local entry = values[i] and decode(field, values[i])
  if not entry or entry.deadline <= now or entry.owner ~= owner or entry.token ~= token then
    return 0
  end
  if entry.state == RELEASED then
    if entry.nonce == nonce then
      by_this = by_this + 1
    else
      by_other = by_other + 1
    end
  end
  entries[i] = entry
end
if by_this + by_other > 0 then
  -- Released already (every item at once): by this same request, sent
  -- again after its reply was lost (1), or by an earlier one (0).
  return by_this == #items and 1 or 0
end
-- Each item kept, marked released by this request, out of its set, for a
-- few seconds at most. Its entry in the expiry set keeps the lock's
-- deadline (one write less): every script treats the marker as gone after
-- `until_`, and the sweep removes it after that deadline.
for i, item in ipairs(items) do
  local entry = entries[i]
  local until_ = math.min(entry.deadline, now + REMEMBER)
  redis.call('HSET', locks, fields[i], encode(until_, token, RELEASED, nonce, owner))
  if item.mode == SHARED then
    redis.call('ZREM', shared, fields[i])
    -- The node's marker goes with its last holder.
    shared_holder(item.key, nil)
  else
    redis.call('ZREM', index, fields[i])
  end
end
local freed = items[1].key
for i = 2, #items do
  freed = freed .. '\n' .. items[i].key
end
announce(channel, freed, values[#items + 1])
return 1
