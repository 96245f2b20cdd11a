-- Fair waiting: the waiters' reservations, what the grants, withdraw and
-- waiters scripts use of them. After common.lua and the_way.lua.
--   KEYS[6] queue:   hash, by field:
--                      ticket <n>     reservation <n>: "deadline nonce
--                                     owner", a line "joined" (when its
--                                     waiter took the ticket), then a line
--                                     per item, "mode key"
--                      nonce <id>     the ticket of the reservation that
--                                     request <id> wrote (a join sent again
--                                     after a lost reply finds its own)
--                      <path key>     the node's marker: a deadline no
--                                     reservation of an item on the node
--                                     outlives (an ancestor's check reads
--                                     the markers of every node above its
--                                     item with one HMGET)
--   KEYS[7] queued:  sorted set, an entry per reserved item at score 0,
--                    "<path key>\1<ticket>\1<mode>": a node's own are the
--                    range [<key>\1, <key>\2), its subtree's the range of
--                    `subtree`; the ticket and the mode, read from the entry,
--                    spare reading reservations that cannot be in the way
--   KEYS[8] queue expiry: sorted set, every `ticket` and marker field at its
--                    deadline (for the sweep)
-- And `queue until` in `locks`: while it is missing or past, no
-- reservation is alive, and a grant looks at none (it reads the field with
-- its nodes, in the same HMGET). Once it has passed, the first fair grant
-- drops the three keys whole: everything in them is dead.
-- A reservation lives RESERVATION from its last write; its waiter writes
-- it again on each attempt. Its `joined` line (in the server's
-- microseconds, as the deadline) stays as the join wrote it through every
-- rewrite, so that a listing can say how long the waiter has been in
-- line. It is digits alone, which no item line is: a reader that does not
-- know it skips it, and a reservation without one (written before it
-- existed) reads as joined just now.

local RESERVATION = 3000000
-- The state of a reservation's row (see `row`): a waiter, not a holder.
local RESERVED = 4

local function ticket_field(ticket)
  return string.format('ticket %d', ticket)
end

local function queued_entry(key, ticket, mode)
  return key .. HOLDER .. string.format('%d', ticket) .. HOLDER .. mode
end

-- The key, ticket and mode of an entry of `queued`.
local function read_queued_entry(entry)
  local key, ticket, mode = string.match(entry, '^(.*)\1(%d+)\1(%a+)$')
  return key, tonumber(ticket), mode
end

-- An item of a live reservation as reported: a row (see `row`) and the
-- milliseconds its waiter has been in line (none before a clock that went
-- back).
local function reserved_row(key, ticket, mode, reservation)
  local waited = math.max(0, math.floor((now - reservation.joined) / 1000))
  return { key, reservation.owner, ticket, remaining(reservation), RESERVED, mode, waited }
end

local function decode_reservation(field, value)
  local deadline, nonce, owner, lines = string.match(value, '^(%d+) (%S+) ([^\n]*)(.*)$')
  if not deadline then
    error('mutextree: the reservation at field ' .. field .. ' of ' .. queue .. ' is unreadable: ' .. value)
  end
  local items = {}
  for mode, key in string.gmatch(lines, '\n(%a+) ([^\n]+)') do
    items[#items + 1] = { key = key, mode = mode }
  end
  local joined = tonumber(string.match(lines, '^\n(%d+)')) or now
  return { deadline = tonumber(deadline), joined = joined, nonce = nonce, owner = owner, items = items }
end

-- Removes reservation `ticket` (as read: `reservation`): its items, its
-- record and its request's.
local function remove_reservation(ticket, reservation)
  local entries = {}
  for i, item in ipairs(reservation.items) do
    entries[i] = queued_entry(item.key, ticket, item.mode)
  end
  redis.call('ZREM', queued, unpack(entries))
  local field = ticket_field(ticket)
  redis.call('HDEL', queue, field, 'nonce ' .. reservation.nonce)
  redis.call('ZREM', queue_expiry, field)
end

-- Reservation `ticket` as stored, live or expired, or nil.
local function stored_reservation(ticket)
  local field = ticket_field(ticket)
  local value = redis.call('HGET', queue, field)
  if not value then
    return nil
  end
  return decode_reservation(field, value)
end

-- The live reservation `ticket`, or nil; an expired one is removed on the
-- way.
local function live_reservation(ticket)
  local reservation = stored_reservation(ticket)
  if reservation and reservation.deadline <= now then
    remove_reservation(ticket, reservation)
    return nil
  end
  return reservation
end

-- The first live reservation's item in the range (from, to) of `queued`
-- that is in the way of an item in `mode` whose request stands `before`
-- in the queue (only smaller tickets come before it): its row, or nil; and
-- whether the range holds any entry still (when it found none in the way).
local function reserved_in(from, to, mode, before)
  local left = false
  while true do
    local batch = redis.call('ZRANGEBYLEX', queued, from, to, 'LIMIT', 0, 16)
    if #batch == 0 then
      return nil, left
    end
    for _, entry in ipairs(batch) do
      local key, ticket, held = read_queued_entry(entry)
      if ticket < before and (mode == EXCLUSIVE or held == EXCLUSIVE) then
        local reservation = live_reservation(ticket)
        if reservation then
          return reserved_row(key, ticket, held, reservation)
        end
      else
        left = true
      end
    end
    from = '(' .. batch[#batch]
  end
end

-- The first live reservation in the way of an item on `key` in `mode`, of
-- a request that stands `before` in the queue: on an ancestor (looked for
-- only where the ancestor's marker is live; a marker whose node has no
-- reservation left goes), on the node or below it. Its row, or nil.
local function reserved_in_the_way(key, mode, before)
  local nodes = node_and_ancestors(key)
  if #nodes > 1 then
    table.remove(nodes, 1)
    local markers = redis.call('HMGET', queue, unpack(nodes))
    for i, node in ipairs(nodes) do
      if markers[i] and tonumber(markers[i]) > now then
        local found, left = reserved_in('[' .. node .. HOLDER, '(' .. node .. '\2', mode, before)
        if found then
          return found
        end
        if not left then
          redis.call('HDEL', queue, node)
          redis.call('ZREM', queue_expiry, node)
        end
      end
    end
  end
  local from, to = subtree(key)
  return (reserved_in(from, to, mode, before))
end

-- Removes up to `limit` expired reservations and markers, oldest first,
-- so that those nobody looks at again cannot pile up while others wait.
local function sweep_queue(limit)
  for _, field in ipairs(redis.call('ZRANGEBYSCORE', queue_expiry, '-inf', now, 'LIMIT', 0, limit)) do
    local ticket = string.match(field, '^ticket (%d+)$')
    -- A reservation is removed on the way (with its items), a marker here.
    if not (ticket and live_reservation(tonumber(ticket))) then
      redis.call('HDEL', queue, field)
      redis.call('ZREM', queue_expiry, field)
    end
  end
end

-- Writes reservation `ticket` of `owner` for `items`, alive for
-- RESERVATION from now: a new one (request `nonce`'s, joined now), or a
-- renewal (which keeps its request's nonce), or one that lapsed (its
-- nonce goes with it). The last two keep when the waiter joined, if the
-- reservation is still stored (a lapsed one is gone once the sweep or the
-- queue's end found it: then it is joined now). Raises its nodes' markers
-- and the namespace's `queue until` (read earlier, or false) to cover it.
local function reserve(ticket, owner, nonce, items, queue_until)
  local joined = now
  local held = stored_reservation(ticket)
  if held then
    joined = held.joined
    if held.deadline > now then
      nonce = held.nonce
    else
      remove_reservation(ticket, held)
    end
  end
  local deadline = now + RESERVATION
  local stamp = string.format('%d', deadline)
  local field = ticket_field(ticket)
  local lines, entries, nodes = { stamp .. ' ' .. nonce .. ' ' .. owner, string.format('%d', joined) }, {}, {}
  for i, item in ipairs(items) do
    lines[i + 2] = item.mode .. ' ' .. item.key
    entries[2 * i - 1], entries[2 * i] = 0, queued_entry(item.key, ticket, item.mode)
    nodes[i] = item.key
  end
  local fields = { field, table.concat(lines, '\n'), 'nonce ' .. nonce, string.format('%d', ticket) }
  local deadlines = { deadline, field }
  local markers = redis.call('HMGET', queue, unpack(nodes))
  for i, key in ipairs(nodes) do
    if not markers[i] or tonumber(markers[i]) < deadline then
      table.insert(fields, key)
      table.insert(fields, stamp)
      table.insert(deadlines, deadline)
      table.insert(deadlines, key)
    end
  end
  redis.call('HSET', queue, unpack(fields))
  redis.call('ZADD', queued, unpack(entries))
  redis.call('ZADD', queue_expiry, unpack(deadlines))
  if not queue_until or tonumber(queue_until) < deadline then
    redis.call('HSET', locks, QUEUE_UNTIL, stamp)
  end
  -- It added at most two fields and an entry per item, and two fields.
  sweep_queue(4 * (#items + 1))
end

-- Removes reservation `ticket` if it is `owner`'s: the reservation if it
-- was live, else nil.
local function withdraw_reservation(ticket, owner)
  local reservation = live_reservation(ticket)
  if reservation and reservation.owner == owner then
    remove_reservation(ticket, reservation)
    return reservation
  end
  return nil
end

-- A granted fair request's reservation, if it had one, goes with the
-- grant.
local function leave_queue(position, owner)
  if position.ticket and position.live then
    withdraw_reservation(position.ticket, owner)
  end
end

-- Where a fair request stands in the queue, from its `standing` argument
-- ("try", "join" or its ticket) and the namespace's `queue until` (false
-- when missing): `live` whether a reservation may be alive, `ticket` its
-- own (a join sent again after a lost reply finds the one it took),
-- `before` the tickets that come before it (below it; all, for a request
-- without one), `joins` whether a refusal takes a ticket. A `queue until`
-- that has passed drops every reservation, all dead.
local function position_in_queue(standing, nonce, queue_until)
  local live = queue_until and tonumber(queue_until) > now
  if queue_until and not live then
    redis.call('DEL', queue, queued, queue_expiry)
    redis.call('HDEL', locks, QUEUE_UNTIL)
  end
  local position = { live = live, joins = standing == 'join', ticket = tonumber(standing) }
  if position.joins and live then
    position.ticket = tonumber(redis.call('HGET', queue, 'nonce ' .. nonce))
  end
  position.before = position.ticket or math.huge
  return position
end

-- The rows of what refuses a request, in item order: for each item, the
-- grant in its way (`blocked[i]`, a row, if any), else, for a fair request
-- (`position`; false for one that barges), the first live reservation
-- before it in its way, if any.
local function blockers_in_order(items, blocked, position)
  local rows = {}
  for i, item in ipairs(items) do
    local found = blocked[i]
    if not found and position and position.live then
      found = reserved_in_the_way(item.key, item.mode, position.before)
    end
    rows[#rows + 1] = found
  end
  return rows
end

-- The answer to a refused request, `rows` its blockers: {0, rows...} for
-- one that barges (`position` false) or tries; for one that waits, its
-- reservation written (with a new ticket for a join) or renewed, and {2,
-- ticket, rows...}.
local function refused_in_queue(rows, position, owner, nonce, items, queue_until)
  if not (position and (position.joins or position.ticket)) then
    return { 0, unpack(rows) }
  end
  local ticket = position.ticket or redis.call('INCR', counter)
  reserve(ticket, owner, nonce, items, queue_until)
  return { 2, ticket, unpack(rows) }
end
