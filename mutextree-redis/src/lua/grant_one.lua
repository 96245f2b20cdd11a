-- Grants one Exclusive item, or reports the live entry in the way: the
-- request most are, so its script defines only what it uses (common.lua,
-- the_way.lua, queue.lua), since Redis runs a script's whole text on
-- every call.
-- ARGV as grant.lua's: scope ("tree" or "key"), ttl ms, state (0 held, 1
-- transient), nonce, owner, standing ("barge", "try", "join" or a
-- ticket), the item's key and mode (exclusive).
-- Returns {1, token, ttl ms}, {0, row} or {2, ticket, row}, a row being
-- {key, owner, token, remaining ms, state, mode} (a reservation's with the
-- ms its waiter has been in line, last).
local tree, ttl, state, nonce, owner, standing, key =
  ARGV[1] == 'tree', tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[4], ARGV[5], ARGV[6], ARGV[7]
local fair = tree and standing ~= 'barge'

local field, entry, queue_until = in_the_way(key, EXCLUSIVE, tree, nil, fair)
-- Its own entry, which carries the nonce, is in its way when it is sent
-- again after a lost reply: the same grant. No record needed.
if field == key and entry.nonce == nonce then
  return { 1, entry.token, remaining(entry) }
end
-- The queue costs nothing more unless the request is refused or a
-- reservation may be alive.
local position
if fair and (field or queue_until) then
  position = position_in_queue(standing, nonce, queue_until)
  local items = { { key = key, mode = EXCLUSIVE } }
  local rows = blockers_in_order(items, { field and row(field, entry) }, position)
  if #rows > 0 then
    return refused_in_queue(rows, position, owner, nonce, items, queue_until)
  end
elseif field then
  return { 0, row(field, entry) }
end

local token = redis.call('INCR', counter)
write_entry(key, index, now + ttl * 1000, token, state, nonce, owner)
if position then
  leave_queue(position, owner)
end
-- Bounded sweep, so that entries nobody looks at again cannot pile up: the
-- grant adds one entry, and every 16th removes up to 64 expired ones.
if token % 16 == 0 then
  sweep(64)
end
return { 1, token, ttl }
