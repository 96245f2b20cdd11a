-- Changes every item of one live grant to a mode, with a new token and the
-- same deadline, if nothing else is in the way of the changed items.
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

-- Checked either way, each item in its new mode, the grant's own entries
-- aside. Natively nothing conflicts with a live grant's downgrade; but a
-- stepwise client holds its node's key (and its token) before it looks
-- below it, and a downgrade below in between would take a newer token: it
-- is refused for that moment, so tokens keep rising across conflicting
-- grants.
local own = {}
for i, held in ipairs(entries) do
  own[i] = held.field
end
local found = in_the_way_of(items, mode, true, own)
if #found > 0 then
  return refusal(found)
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
