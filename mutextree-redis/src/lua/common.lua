-- Shared by every script. On Redis 7 and later every script is a function
-- of one library (see scripts.rs) defined once per server, this prelude
-- and its parts (items.lua, the_way.lua, checks.lua, queue.lua) with it.
-- Older servers get each script by EVAL with this prelude and only the
-- parts it uses, since EVAL runs a script's whole text, every function
-- definition included, on each call; so this file defines only what the
-- single Exclusive grant (grant_one.lua) and list use. Every script calls
-- `begin` first. One namespace, eight keys in one hash slot:
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
--                      queue until            a deadline no reservation
--                                             of the namespace outlives
--                                             (missing: none is stored)
--                    Path keys end with "/" and never hold a control
--                    character, so no two kinds of field can be confused.
--   KEYS[2] index:   sorted set, the Exclusive path keys at score 0
--   KEYS[3] expiry:  sorted set, every field above but `listened`,
--                    `shared until` and `queue until` at its deadline (for
--                    the sweep)
--   KEYS[4] counter: the fencing token counter (INCR)
--   KEYS[5] shared:  sorted set, the Shared fields (<path key>\1<token>) at
--                    score 0
--   KEYS[6..8] queue, queued, queue expiry: the waiters' reservations
--                    (see queue.lua)
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
-- Set by `begin` at the start of every call: the keys, the arguments
-- (ARGV) and the server's time. A script's text is defined once per server
-- as a function library (see scripts.rs), so nothing of a call may be read
-- while the prelude is defined.
local locks, index, expiry, counter, shared, queue, queued, queue_expiry, arguments, now

local function begin(keys, args)
  locks, index, expiry, counter, shared = keys[1], keys[2], keys[3], keys[4], keys[5]
  queue, queued, queue_expiry = keys[6], keys[7], keys[8]
  arguments = args
  local time = redis.call('TIME')
  now = tonumber(time[1]) * 1000000 + tonumber(time[2])
end

local RELEASED, SHARED_NODE = 2, 3
local SHARED, EXCLUSIVE = 'shared', 'exclusive'
local HOLDER = '\1'
local REMEMBER = 5000000
local LISTENED = 'listened'
local SHARED_UNTIL = 'shared until'
local QUEUE_UNTIL = 'queue until'

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

-- The node's key and the mode of the item at `field` (a Shared item's
-- field is its node's key, HOLDER, its token: see items.lua).
local function node_of(field)
  local at = string.find(field, HOLDER, 1, true)
  if at then
    return string.sub(field, 1, at - 1), SHARED
  end
  return field, EXCLUSIVE
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
