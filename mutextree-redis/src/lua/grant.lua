-- Grants every item of a request with one token, or reports a live entry
-- in the way of each blocked item and grants nothing. (One Exclusive item,
-- what most requests are, has its own lighter script: grant_one.lua.)
-- ARGV: scope ("tree": the items' nodes, ancestors and descendants are
-- checked; "key": only the node, for the stepwise primitive), ttl ms, state
-- (0 held, 1 transient), nonce, owner, standing in the waiters' queue
-- ("barge": not looked at; "try", "join", or the ticket of a request that
-- waits: see queue.lua), then each item's key and mode.
-- Returns {1, token, ttl ms}, {0, row...} or, for a refused request that
-- waits, {2, ticket, row...}: a row {key, owner, token, remaining ms,
-- state, mode} per blocked item, in item order (a reservation's with the
-- ms its waiter has been in line, last).
local tree, ttl, state, nonce, owner, standing =
  ARGV[1] == 'tree', tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[4], ARGV[5], ARGV[6]
local items = read_items(7)
local fair = tree and standing ~= 'barge'
-- Sent again after a lost reply: recognised by the record of its answer.
local earlier = remembered(nonce)
if earlier then
  return earlier
end

-- The grants in the way, and `queue until` with the first item's nodes.
local blocked, queue_until = {}, false
for i, item in ipairs(items) do
  local field, entry, until_ = in_the_way(item.key, item.mode, tree, nil, fair and i == 1)
  if i == 1 then
    queue_until = until_
  end
  blocked[i] = field and row(field, entry)
end
local position = fair and position_in_queue(standing, nonce, queue_until)
local rows = blockers_in_order(items, blocked, position)
if #rows > 0 then
  return refused_in_queue(rows, position, owner, nonce, items, queue_until)
end

local token = redis.call('INCR', counter)
local deadline = now + ttl * 1000
for _, item in ipairs(items) do
  place(item.key, item.mode, deadline, token, state, nonce, owner)
end
remember(nonce, token, deadline)
if position then
  leave_queue(position, owner)
end
sweep_after(items)
return { 1, token, ttl }
