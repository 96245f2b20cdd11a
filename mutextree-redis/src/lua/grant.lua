-- Grants one lock, or reports one live lock in the way.
-- ARGV: mode ("tree": node, ancestors and descendants must be free; "key":
-- only the node), node key, ttl ms, state (0 held, 1 transient), nonce, owner.
-- Returns {1, token, ttl ms} or {0, key, owner, token, remaining ms, transient}.
local tree, node, ttl, state, nonce, owner =
  ARGV[1] == 'tree', ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4]), ARGV[5], ARGV[6]

-- The node, then (for a tree grant) its ancestors root first: every prefix
-- of the key ending at a separator. One read for all of them.
local keys = { node }
if tree then
  for stop in string.gmatch(node, '()/') do
    if stop < #node then
      table.insert(keys, string.sub(node, 1, stop))
    end
  end
end
local values = redis.call('HMGET', locks, unpack(keys))

local mine = live_value(node, values[1])
if mine then
  if mine.nonce == nonce then
    -- This very request, sent again after a lost reply: the same grant.
    return { 1, mine.token, remaining(mine) }
  end
  return blocked(node, mine)
end

if tree then
  for i = 2, #keys do
    local lock = live_value(keys[i], values[i])
    if lock then
      return blocked(keys[i], lock)
    end
  end
  -- Descendants: the keys strictly after the node's and before its range
  -- end (the key with its last "/" made "0"), in index order.
  local from, to = '(' .. node, '(' .. string.sub(node, 1, -2) .. '0'
  while true do
    local below = redis.call('ZRANGEBYLEX', index, from, to, 'LIMIT', 0, 16)
    if #below == 0 then
      break
    end
    for _, key in ipairs(below) do
      local lock = live(key)
      if lock then
        return blocked(key, lock)
      end
    end
    from = '(' .. below[#below]
  end
end

local token = redis.call('INCR', counter)
-- Bounded sweep, on every 16th grant: up to 64 expired locks of the
-- namespace, oldest first, so that locks nobody looks at again cannot pile
-- up (each grant adds at most one).
if token % 16 == 0 then
  for _, key in ipairs(redis.call('ZRANGEBYSCORE', expiry, '-inf', now, 'LIMIT', 0, 64)) do
    forget(key)
  end
end
local deadline = now + ttl * 1000
redis.call('HSET', locks, node, encode(deadline, token, state, nonce, owner))
redis.call('ZADD', index, 0, node)
redis.call('ZADD', expiry, deadline, node)
return { 1, token, ttl }
