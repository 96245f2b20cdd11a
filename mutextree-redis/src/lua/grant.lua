-- Grants every item of a request with one token, or reports a live entry
-- in the way of each blocked item and grants nothing. (One Exclusive item,
-- what most requests are, has its own lighter script: grant_one.lua.)
-- ARGV: scope ("tree": the items' nodes, ancestors and descendants are
-- checked; "key": only the node, for the stepwise primitive), ttl ms, state
-- (0 held, 1 transient), nonce, owner, then each item's key and mode.
-- Returns {1, token, ttl ms} or {0, {key, owner, token, remaining ms,
-- state, mode}...}, one row per blocked item in item order.
local tree, ttl, state, nonce, owner =
  ARGV[1] == 'tree', tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[4], ARGV[5]
local items = read_items(6)
-- Sent again after a lost reply: recognised by the record of its answer.
local earlier = remembered(nonce)
if earlier then
  return earlier
end

local found = in_the_way_of(items, nil, tree, {})
if #found > 0 then
  return refusal(found)
end

local token = redis.call('INCR', counter)
local deadline = now + ttl * 1000
for _, item in ipairs(items) do
  place(item.key, item.mode, deadline, token, state, nonce, owner)
end
remember(nonce, token, deadline)
sweep_after(items)
return { 1, token, ttl }
