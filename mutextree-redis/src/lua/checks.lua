-- The checks and writes of the scripts that grant or change items on a
-- request's items (grant, change_mode, refresh), prepended to them after
-- common.lua, items.lua and the_way.lua. Apart from them because Redis
-- runs a script's whole text on every call, so every function defined
-- costs each call: a release, the other half of every pair, and the single
-- Exclusive grant define only what they use.

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
  write_entry(field, mode == SHARED and shared or index, deadline, token, state, nonce, owner)
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

-- After any request but one Exclusive item (which sweeps on its own
-- schedule): it added at most two entries per item (the item, its node's
-- marker) and its record; up to four times as many expired ones go.
local function sweep_after(items)
  sweep(4 * (2 * #items + 1))
end
