-- Sets the remaining life of every item of exactly one grant to ttl.
-- ARGV: ttl ms, owner, token, then each item's key and mode. Returns 1, or 0
-- (changing nothing) if the grant is not live.
local ttl, owner, token = tonumber(ARGV[1]), ARGV[2], tonumber(ARGV[3])
local items = read_items(4)
local entries = grant_entries(items, owner, token)
if not entries then
  return 0
end
local deadline = now + ttl * 1000
for i, item in ipairs(items) do
  local held = entries[i]
  redis.call('HSET', locks, held.field, encode(deadline, token, held.entry.state, held.entry.nonce, owner))
  redis.call('ZADD', expiry, deadline, held.field)
  if item.mode == SHARED then
    mark_shared(item.key, deadline)
  end
end
return 1
