-- Shared by every script (prepended to each). One namespace, four keys in
-- one hash slot:
--   KEYS[1] locks:   hash, path key -> "deadline token transient nonce owner"
--   KEYS[2] index:   sorted set, every path key at score 0 (lexical order)
--   KEYS[3] expiry:  sorted set, path key at its deadline (for the sweep)
--   KEYS[4] counter: the fencing token counter (INCR)
-- Deadlines are milliseconds of the server's TIME, the only clock used.
local locks, index, expiry, counter = KEYS[1], KEYS[2], KEYS[3], KEYS[4]

local now = redis.call('TIME')
now = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)

local function decode(value)
  local deadline, token, transient, nonce, owner = string.match(value, '^(%d+) (%d+) ([01]) (%S+) (.*)$')
  return { deadline = tonumber(deadline), token = tonumber(token), transient = tonumber(transient),
           nonce = nonce, owner = owner }
end

local function encode(deadline, token, transient, nonce, owner)
  return string.format('%d %d %d %s %s', deadline, token, transient, nonce, owner)
end

local function forget(key)
  redis.call('HDEL', locks, key)
  redis.call('ZREM', index, key)
  redis.call('ZREM', expiry, key)
end

-- The live lock on `key`, or nil; an expired one is removed on the way.
local function live(key)
  local value = redis.call('HGET', locks, key)
  if not value then
    return nil
  end
  local lock = decode(value)
  if lock.deadline > now then
    return lock
  end
  forget(key)
  return nil
end

local function blocked(key, lock)
  return { 0, key, lock.owner, lock.token, lock.deadline - now, lock.transient }
end
