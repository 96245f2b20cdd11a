-- Grants one lock, or reports one live lock in the way.
-- ARGV: mode ("tree": node, ancestors and descendants must be free; "key":
-- only the node), node key, ttl ms, state (0 held, 1 transient), nonce, owner.
-- Returns {1, token, ttl ms} or {0, key, owner, token, remaining ms, transient}.
local tree, node, ttl, state, nonce, owner =
  ARGV[1] == 'tree', ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4]), ARGV[5], ARGV[6]

-- Bounded sweep: a few expired locks of the namespace, oldest first, so
-- locks nobody looks at again cannot pile up (each grant adds at most one).
for _, key in ipairs(redis.call('ZRANGEBYSCORE', expiry, '-inf', now, 'LIMIT', 0, 4)) do
  forget(key)
end

local mine = live(node)
if mine then
  if mine.nonce == nonce then
    -- This very request, sent again after a lost reply: the same grant.
    return { 1, mine.token, remaining(mine) }
  end
  return blocked(node, mine)
end

if tree then
  -- Ancestors: every prefix of the key ending at a separator.
  for stop in string.gmatch(node, '()/') do
    if stop < #node then
      local ancestor = string.sub(node, 1, stop)
      local lock = live(ancestor)
      if lock then
        return blocked(ancestor, lock)
      end
    end
  end
  -- Descendants: the keys strictly after the node's and before its range
  -- end (the key with its last "/" made "0"), in index order.
  local from, to = '(' .. node, '(' .. string.sub(node, 1, -2) .. '0'
  while true do
    local keys = redis.call('ZRANGEBYLEX', index, from, to, 'LIMIT', 0, 16)
    if #keys == 0 then
      break
    end
    for _, key in ipairs(keys) do
      local lock = live(key)
      if lock then
        return blocked(key, lock)
      end
    end
    from = '(' .. keys[#keys]
  end
end

local token = redis.call('INCR', counter)
local deadline = now + ttl * 1000
redis.call('HSET', locks, node, encode(deadline, token, state, nonce, owner))
redis.call('ZADD', index, 0, node)
redis.call('ZADD', expiry, deadline, node)
return { 1, token, ttl }
