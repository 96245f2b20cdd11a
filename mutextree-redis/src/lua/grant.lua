-- Grants every item of a request with one token, or reports a live entry
-- in the way of each blocked item and grants nothing.
-- ARGV: scope ("tree": the items' nodes, ancestors and descendants are
-- checked; "key": only the node, for the stepwise primitive), ttl ms, state
-- (0 held, 1 transient), nonce, owner, then each item's key and mode.
-- Returns {1, token, ttl ms} or {0, {key, owner, token, remaining ms,
-- state, mode}...}, one row per blocked item in item order.
local tree, ttl, state, nonce, owner =
  ARGV[1] == 'tree', tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[4], ARGV[5]
local items = read_items(6)
-- One Exclusive item, what most requests are, is recognised when sent
-- again by its own entry, which carries the nonce and is in its way. Any
-- other request leaves a record of its answer.
local single = #items == 1 and items[1].mode == EXCLUSIVE
if not single then
  local earlier = remembered(nonce)
  if earlier then
    return earlier
  end
end

local found = in_the_way_of(items, nil, tree, {})
if #found > 0 then
  local mine = found[1]
  if single and mine.field == items[1].key and mine.entry.nonce == nonce then
    -- This very request, sent again after a lost reply: the same grant.
    return { 1, mine.entry.token, remaining(mine.entry) }
  end
  return refusal(found)
end

local token = redis.call('INCR', counter)
local deadline = now + ttl * 1000
for _, item in ipairs(items) do
  place(item.key, item.mode, deadline, token, state, nonce, owner)
end
-- Bounded sweep, so that entries nobody looks at again cannot pile up: a
-- single Exclusive item adds one entry, and every 16th such grant removes
-- up to 64 expired ones.
if single then
  if token % 16 == 0 then
    sweep(64)
  end
else
  remember(nonce, token, deadline)
  sweep_after(items)
end
return { 1, token, ttl }
