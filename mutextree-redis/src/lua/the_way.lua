-- What every grant uses, the single Exclusive one (grant_one.lua)
-- included: the check of one item, the write of an entry, the sweep.
-- After common.lua.

-- The node `key` and its ancestors, root first.
local function node_and_ancestors(key)
  local nodes = { key }
  for stop in string.gmatch(key, '()/') do
    if stop < #key then
      nodes[#nodes + 1] = string.sub(key, 1, stop)
    end
  end
  return nodes
end

-- The ZRANGEBYLEX bounds of the fields that extend the node `key`'s in a
-- set of fields that start with their node's key: everything below the
-- node, and its own fields that carry more than its key (`key\1...`).
local function subtree(key)
  return '(' .. key, '(' .. string.sub(key, 1, -2) .. '0'
end

-- The first live entry in the way of an item on `key` in `mode`: its field
-- and value, or nil; and, if `queued` (a fair request), the namespace's
-- `queue until` (false when missing). `tree`: on the node, an ancestor or
-- a descendant (the node, then the ancestors root first, then the
-- subtree); otherwise on the node only (the stepwise primitive, Exclusive:
-- any holder is in its way). `own`: the field of an item being changed
-- (its node's key, or its Shared holder's field), not in its own way. One
-- HMGET for the node, its ancestors and the namespace's deadlines; ranges
-- of the sets for the subtree, where a Shared item looks at Exclusive
-- entries only, and an Exclusive one at Shared entries only while `shared
-- until` says one may be alive: most namespaces hold Exclusive items
-- only, and pay for one range.
local function in_the_way(key, mode, tree, own, queued)
  local fields = tree and node_and_ancestors(key) or { key }
  local nodes = #fields
  local readers = tree and mode == EXCLUSIVE
  if readers then
    fields[#fields + 1] = SHARED_UNTIL
  end
  if queued then
    fields[#fields + 1] = QUEUE_UNTIL
  end
  local values = redis.call('HMGET', locks, unpack(fields))
  local queue_until = queued and values[#fields]
  for i = 1, nodes do
    local field = fields[i]
    local entry = live_value(field, values[i])
    if entry and field ~= own then
      if entry.state ~= SHARED_NODE then
        return field, entry, queue_until
      end
      if mode == EXCLUSIVE then
        local holder, held = shared_holder(field, own)
        if holder then
          return holder, held, queue_until
        end
      end
    end
  end
  if not tree then
    return nil, nil, queue_until
  end
  local from, to = subtree(key)
  local field, entry = first_live(index, from, to, nil)
  local shared_until = readers and values[nodes + 1]
  if field == nil and shared_until and tonumber(shared_until) > now then
    field, entry = first_live(shared, from, to, own)
  end
  return field, entry, queue_until
end

-- Writes the entry of an item, in `set` (index or shared) and the expiry
-- set.
local function write_entry(field, set, deadline, token, state, nonce, owner)
  redis.call('HSET', locks, field, encode(deadline, token, state, nonce, owner))
  redis.call('ZADD', set, 0, field)
  redis.call('ZADD', expiry, deadline, field)
end

-- Removes up to `limit` expired entries of the namespace, oldest first, so
-- that entries nobody looks at again cannot pile up.
local function sweep(limit)
  for _, field in ipairs(redis.call('ZRANGEBYSCORE', expiry, '-inf', now, 'LIMIT', 0, limit)) do
    forget(field)
  end
end
