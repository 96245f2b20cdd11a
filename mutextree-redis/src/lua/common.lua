-- Shared by every script (prepended to each). One namespace, five keys in
-- one hash slot:
--   KEYS[1] locks:   hash of entries, by field:
--                      <path key>             an Exclusive item (or a
--                                             stepwise lock), or the node's
--                                             Shared marker (state 3)
--                      <path key>\1<token>    a Shared item of grant <token>
--                      request <id>           "deadline token": the answer
--                                             to a request that is not one
--                                             Exclusive item, for its resend
--                      listened               until when some backend
--                                             listens for releases
--                      shared until           a deadline no Shared item
--                                             of the namespace outlives
--                                             (missing: none ever was)
--                    Path keys end with "/" and never hold a control
--                    character, so no two kinds of field can be confused.
--   KEYS[2] index:   sorted set, the Exclusive path keys at score 0
--   KEYS[3] expiry:  sorted set, every field above but `listened` and
--                    `shared until` at its deadline (for the sweep)
--   KEYS[4] counter: the fencing token counter (INCR)
--   KEYS[5] shared:  sorted set, the Shared fields (<path key>\1<token>) at
--                    score 0
-- Both sets are in lexical order: the entries under a node are one range of
-- each (from the node's key to the key with its last "/" made "0"), and a
-- node's own Shared holders the range [<key>\1, <key>\2).
-- An entry's value is "deadline token state nonce owner". Deadlines are
-- microseconds of the server's TIME, the only clock used (below 2^53, so
-- exact in Lua's numbers). A lock lives exactly its ttl from the moment its
-- script ran, never less, so a client that counts the ttl from the moment it
-- sent the request never outlives it.
-- state: 0 held, 1 held transiently (a stepwise client's parent), 2
-- released (kept a few seconds so that a release sent twice, after a lost
-- reply, is answered as the first one was), 3 a Shared marker: the node has
-- had Shared holders, all dead by its deadline. It lets a check of the
-- node's key (one HMGET for a node and all its ancestors) tell whether to
-- look for Shared holders there.
local locks, index, expiry, counter, shared = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]

local now = redis.call('TIME')
now = tonumber(now[1]) * 1000000 + tonumber(now[2])

local RELEASED, SHARED_NODE = 2, 3
local SHARED, EXCLUSIVE = 'shared', 'exclusive'
local HOLDER = '\1'
local REMEMBER = 5000000
local LISTENED = 'listened'
local SHARED_UNTIL = 'shared until'

local function decode(field, value)
  local deadline, token, state, nonce, owner = string.match(value, '^(%d+) (%d+) ([0-3]) (%S+) (.*)$')
  if not deadline then
    error('mutextree: the lock at field ' .. field .. ' of ' .. locks .. ' is unreadable: ' .. value)
  end
  return { deadline = tonumber(deadline), token = tonumber(token), state = tonumber(state),
           nonce = nonce, owner = owner }
end

local function encode(deadline, token, state, nonce, owner)
  return string.format('%d %d %d %s %s', deadline, token, state, nonce, owner)
end

-- The field of a Shared item, and back: the node's key and the item's mode.
local function holder_field(key, token)
  return key .. HOLDER .. string.format('%d', token)
end

local function node_of(field)
  local at = string.find(field, HOLDER, 1, true)
  if at then
    return string.sub(field, 1, at - 1), SHARED
  end
  return field, EXCLUSIVE
end

-- The field of an item of grant `token`.
local function item_field(key, mode, token)
  if mode == SHARED then
    return holder_field(key, token)
  end
  return key
end

local function forget(field)
  redis.call('HDEL', locks, field)
  local _, mode = node_of(field)
  redis.call('ZREM', mode == SHARED and shared or index, field)
  redis.call('ZREM', expiry, field)
end

-- The live entry whose stored value (from HGET or HMGET: false when
-- missing) is `value`, or nil; an expired one is removed on the way.
local function live_value(field, value)
  if not value then
    return nil
  end
  local entry = decode(field, value)
  if entry.deadline <= now then
    forget(field)
    return nil
  end
  if entry.state == RELEASED then
    return nil
  end
  return entry
end

-- The live entry at `field`, or nil.
local function live(field)
  return live_value(field, redis.call('HGET', locks, field))
end

-- Milliseconds left, rounded down.
local function remaining(entry)
  return math.floor((entry.deadline - now) / 1000)
end

-- An entry as reported: {key, owner, token, remaining ms, state, mode}.
local function row(field, entry)
  local key, mode = node_of(field)
  return { key, entry.owner, entry.token, remaining(entry), entry.state, mode }
end

-- The first live entry of `set` in the ZRANGEBYLEX range (from, to), but
-- `own`: its field and value, or nil.
local function first_live(set, from, to, own)
  while true do
    local batch = redis.call('ZRANGEBYLEX', set, from, to, 'LIMIT', 0, 16)
    if #batch == 0 then
      return nil
    end
    for _, field in ipairs(batch) do
      if field ~= own then
        local entry = live(field)
        if entry then
          return field, entry
        end
      end
    end
    from = '(' .. batch[#batch]
  end
end

-- A live Shared holder of the node `key` (whose marker is live) but `own`:
-- its field and value, or nil. A marker with no live holder is removed.
local function shared_holder(key, own)
  local field, entry = first_live(shared, '[' .. key .. HOLDER, '(' .. key .. '\2', own)
  if field == nil and own == nil then
    forget(key)
  end
  return field, entry
end

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

-- The items of a request from ARGV[first] on: key, mode pairs.
local function read_items(first)
  local items = {}
  for at = first, #ARGV, 2 do
    table.insert(items, { key = ARGV[at], mode = ARGV[at + 1] })
  end
  return items
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

-- Tells waiters that something was freed: only while a backend has said it
-- listens (see listen.lua), since Redis writes a message to every
-- subscribed connection. `listened`: the field's value if read already
-- (false when missing), else nil.
local function announce(channel, message, listened)
  if listened == nil then
    listened = redis.call('HGET', locks, LISTENED)
  end
  if listened and tonumber(listened) > now then
    redis.call('PUBLISH', channel, message)
  end
end
