-- Shared by every script (prepended to each). One namespace, four keys in
-- one hash slot:
--   KEYS[1] locks:   hash, path key -> "deadline token state nonce owner",
--                    and the field LISTENED (no path key lacks the final
--                    "/"): until when some backend listens for releases
--   KEYS[2] index:   sorted set, the held path keys at score 0 (lexical order)
--   KEYS[3] expiry:  sorted set, path key at its deadline (for the sweep)
--   KEYS[4] counter: the fencing token counter (INCR)
-- Deadlines are microseconds of the server's TIME, the only clock used
-- (below 2^53, so exact in Lua's numbers). A lock lives exactly its ttl
-- from the moment its script ran, never less, so a client that counts the
-- ttl from the moment it sent the request never outlives it.
-- state: 0 held, 1 held transiently (a stepwise client's parent), 2
-- released (kept a few seconds so that a release sent twice, after a lost
-- reply, is answered as the first one was).
local locks, index, expiry, counter = KEYS[1], KEYS[2], KEYS[3], KEYS[4]

local now = redis.call('TIME')
now = tonumber(now[1]) * 1000000 + tonumber(now[2])

local RELEASED = 2
local REMEMBER_RELEASE = 5000000
local LISTENED = 'listened'

local function decode(key, value)
  local deadline, token, state, nonce, owner = string.match(value, '^(%d+) (%d+) ([012]) (%S+) (.*)$')
  if not deadline then
    error('mutextree: the lock at key ' .. key .. ' of ' .. locks .. ' is unreadable: ' .. value)
  end
  return { deadline = tonumber(deadline), token = tonumber(token), state = tonumber(state),
           nonce = nonce, owner = owner }
end

local function encode(deadline, token, state, nonce, owner)
  return string.format('%d %d %d %s %s', deadline, token, state, nonce, owner)
end

local function forget(key)
  redis.call('HDEL', locks, key)
  redis.call('ZREM', index, key)
  redis.call('ZREM', expiry, key)
end

-- The live lock whose stored value (from HGET or HMGET: false when
-- missing) is `value`, or nil; an expired one is removed on the way.
local function live_value(key, value)
  if not value then
    return nil
  end
  local lock = decode(key, value)
  if lock.deadline <= now then
    forget(key)
    return nil
  end
  if lock.state == RELEASED then
    return nil
  end
  return lock
end

-- The live lock on `key`, or nil.
local function live(key)
  return live_value(key, redis.call('HGET', locks, key))
end

-- Milliseconds left, rounded down.
local function remaining(lock)
  return math.floor((lock.deadline - now) / 1000)
end

local function blocked(key, lock)
  return { 0, key, lock.owner, lock.token, remaining(lock), lock.state }
end
