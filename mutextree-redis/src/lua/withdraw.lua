-- Removes a waiter's reservation, if it is there and its owner's, and
-- tells waiters, as a release does: requests behind it may go ahead.
-- ARGV: channel, owner, ticket. Returns 1 if a live reservation was
-- removed, else 0 (changing nothing).
local channel, owner, ticket = ARGV[1], ARGV[2], tonumber(ARGV[3])
local reservation = withdraw_reservation(ticket, owner)
if not reservation then
  return 0
end
local keys = {}
for i, item in ipairs(reservation.items) do
  keys[i] = item.key
end
announce(channel, table.concat(keys, '\n'))
return 1
