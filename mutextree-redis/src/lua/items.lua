-- What the scripts that take a request's items use (every one but the
-- single Exclusive grant, list and listen), after common.lua.

-- The field of a Shared item (node_of reads it back).
local function holder_field(key, token)
  return key .. HOLDER .. string.format('%d', token)
end

-- The field of an item of grant `token`.
local function item_field(key, mode, token)
  if mode == SHARED then
    return holder_field(key, token)
  end
  return key
end

-- The items of a request from ARGV[first] on: key, mode pairs.
local function read_items(first)
  local items = {}
  for at = first, #arguments, 2 do
    table.insert(items, { key = arguments[at], mode = arguments[at + 1] })
  end
  return items
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
