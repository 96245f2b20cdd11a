-- The live reservations' items in a key range of `queued` (the client
-- sorts them, since Lua compares strings by the server's locale); changes
-- nothing.
-- ARGV: ZRANGEBYLEX bounds. Returns a row per item, {key, owner, ticket,
-- remaining ms, RESERVED, mode, ms its waiter has been in line}.
local out = {}
for _, entry in ipairs(redis.call('ZRANGEBYLEX', queued, ARGV[1], ARGV[2])) do
  local key, ticket, mode = read_queued_entry(entry)
  local field = ticket_field(ticket)
  local value = redis.call('HGET', queue, field)
  if value then
    local reservation = decode_reservation(field, value)
    if reservation.deadline > now then
      table.insert(out, reserved_row(key, ticket, mode, reservation))
    end
  end
end
return out
