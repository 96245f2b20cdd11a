-- The checks and writes of the scripts that grant or change items (grant,
-- change_mode, refresh), prepended to them after common.lua. Apart from
-- it because Redis runs a script's whole text on every call, so every
-- function defined costs each call: a release, the other half of every
-- pair, defines only what it uses.

-- The first live entry in the way of an item on `key` in `mode`: its field
-- and value, or nil. `tree`: on the node, an ancestor or a descendant (the
-- node, then the ancestors root first, then the subtree); otherwise on the
-- node only (the stepwise primitive, Exclusive: any holder is in its way).
-- `own`: the field of an item being changed (its node's key, or its Shared
-- holder's field), not in its own way. One HMGET for the node and its
-- ancestors; ranges of the sets for the subtree, where a Shared item looks
-- at Exclusive entries only, and an Exclusive one at Shared entries only
-- while `shared until` (read with the node) says one may be alive: most
-- namespaces hold Exclusive items only, and pay for one range.
local function in_the_way(key, mode, tree, own)
  local fields = { key }
  if tree then
    for stop in string.gmatch(key, '()/') do
      if stop < #key then
        fields[#fields + 1] = string.sub(key, 1, stop)
      end
    end
  end
  local nodes = #fields
  local readers = tree and mode == EXCLUSIVE
  if readers then
    fields[nodes + 1] = SHARED_UNTIL
  end
  local values = redis.call('HMGET', locks, unpack(fields))
  for i = 1, nodes do
    local field = fields[i]
    local entry = live_value(field, values[i])
    if entry and field ~= own then
      if entry.state ~= SHARED_NODE then
        return field, entry
      end
      if mode == EXCLUSIVE then
        local holder, held = shared_holder(field, own)
        if holder then
          return holder, held
        end
      end
    end
  end
  if not tree then
    return nil
  end
  local from, to = '(' .. key, '(' .. string.sub(key, 1, -2) .. '0'
  local field, entry = first_live(index, from, to, nil)
  local shared_until = readers and values[nodes + 1]
  if field == nil and shared_until and tonumber(shared_until) > now then
    field, entry = first_live(shared, from, to, own)
  end
  return field, entry
end

-- What is in the way of each item, in `mode` (or the item's own if nil),
-- the entry `own[i]` of item i aside: {field, entry} per blocked item, in
-- item order.
local function in_the_way_of(items, mode, tree, own)
  local found = {}
  for i, item in ipairs(items) do
    local field, entry = in_the_way(item.key, mode or item.mode, tree, own[i])
    if field then
      table.insert(found, { field = field, entry = entry })
    end
  end
  return found
end

-- The reply that refuses a request: a row per blocked item.
local function refusal(found)
  local rows = {}
  for i, blocker in ipairs(found) do
    rows[i] = row(blocker.field, blocker.entry)
  end
  return { 0, unpack(rows) }
end

-- Raises the node's Shared marker, and the namespace's `shared until`, to
-- cover a holder alive until `deadline`.
local function mark_shared(key, deadline)
  local values = redis.call('HMGET', locks, key, SHARED_UNTIL)
  local marker = live_value(key, values[1])
  if not (marker and marker.state == SHARED_NODE and marker.deadline > deadline) then
    redis.call('HSET', locks, key, encode(deadline, 0, SHARED_NODE, '-', '-'))
    redis.call('ZADD', expiry, deadline, key)
  end
  if not values[2] or tonumber(values[2]) < deadline then
    redis.call('HSET', locks, SHARED_UNTIL, string.format('%d', deadline))
  end
end

-- Writes an item of grant `token` (its node checked free for it).
local function place(key, mode, deadline, token, state, nonce, owner)
  local field = item_field(key, mode, token)
  redis.call('HSET', locks, field, encode(deadline, token, state, nonce, owner))
  redis.call('ZADD', mode == SHARED and shared or index, 0, field)
  redis.call('ZADD', expiry, deadline, field)
  if mode == SHARED then
    mark_shared(key, deadline)
  end
end

-- The live entries of every item of grant `token` of `owner`, in item
-- order, or nil if one is missing, dead or someone else's.
local function grant_entries(items, owner, token)
  local fields = {}
  for i, item in ipairs(items) do
    fields[i] = item_field(item.key, item.mode, token)
  end
  local values = redis.call('HMGET', locks, unpack(fields))
  local entries = {}
  for i, field in ipairs(fields) do
    local entry = live_value(field, values[i])
    if not entry or entry.state == SHARED_NODE or entry.owner ~= owner or entry.token ~= token then
      return nil
    end
    entries[i] = { field = field, entry = entry }
  end
  return entries
end

-- The answer given to request `nonce` if it ran already: {1, token,
-- remaining ms}, or nil.
local function remembered(nonce)
  local value = redis.call('HGET', locks, 'request ' .. nonce)
  if not value then
    return nil
  end
  local deadline, token = string.match(value, '^(%d+) (%d+)$')
  deadline = tonumber(deadline)
  if deadline <= now then
    return nil
  end
  return { 1, tonumber(token), math.floor((deadline - now) / 1000) }
end

-- Remembers for a few seconds that request `nonce` got grant `token`,
-- alive until `deadline`.
local function remember(nonce, token, deadline)
  local field = 'request ' .. nonce
  redis.call('HSET', locks, field, string.format('%d %d', deadline, token))
  redis.call('ZADD', expiry, math.min(deadline, now + REMEMBER), field)
end

-- Removes up to `limit` expired entries of the namespace, oldest first, so
-- that entries nobody looks at again cannot pile up.
local function sweep(limit)
  for _, field in ipairs(redis.call('ZRANGEBYSCORE', expiry, '-inf', now, 'LIMIT', 0, limit)) do
    forget(field)
  end
end

-- After any request but one Exclusive item (which sweeps on its own
-- schedule): it added at most two entries per item (the item, its node's
-- marker) and its record; up to four times as many expired ones go.
local function sweep_after(items)
  sweep(4 * (2 * #items + 1))
end
