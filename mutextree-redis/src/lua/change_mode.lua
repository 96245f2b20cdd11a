-- Changes every item of one live grant to a mode, with a new token and the
-- same deadline; an upgrade only if nothing else is in the way.
-- ARGV: mode, owner, token, nonce, channel, then each item's key and mode
-- as held. Returns {1, new token, remaining ms}, {0, {key, owner, token,
-- remaining ms, state, mode}...} (one row per blocked item, in item order;
-- the grant unchanged), or 0 if the grant is not live.
local mode, owner, token, nonce, channel = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4], ARGV[5]
local items = read_items(6)
local earlier = remembered(nonce)
if earlier then
  -- This very change, sent again after a lost reply.
  return earlier
end
local entries = grant_entries(items, owner, token)
if not entries then
  return 0
end

if mode == EXCLUSIVE then
  local blockers = {}
  for i, item in ipairs(items) do
    if item.mode == SHARED then
      local field, entry = in_the_way(item.key, EXCLUSIVE, true, entries[i].field)
      if field then
        table.insert(blockers, row(field, entry))
      end
    end
  end
  if #blockers > 0 then
    return { 0, unpack(blockers) }
  end
end

local changed = redis.call('INCR', counter)
local freed = {}
for i, item in ipairs(items) do
  local held = entries[i].entry
  forget(entries[i].field)
  place(item.key, mode, held.deadline, changed, held.state, nonce, owner)
  if item.mode == EXCLUSIVE and mode == SHARED then
    table.insert(freed, item.key)
  end
end
remember(nonce, changed, entries[1].entry.deadline)
sweep_after(items)
if #freed > 0 then
  -- Readers waiting for a downgraded item may go ahead.
  announce(channel, table.concat(freed, '\n'))
end
return { 1, changed, remaining(entries[1].entry) }
