-- The live items in a key range (Exclusive ones, then Shared ones; the
-- client sorts them, since Lua compares strings by the server's locale);
-- changes nothing.
-- ARGV: ZRANGEBYLEX bounds. Returns {key, owner, token, remaining ms,
-- state, mode}...
local out = {}
for _, set in ipairs({ index, shared }) do
  for _, field in ipairs(redis.call('ZRANGEBYLEX', set, ARGV[1], ARGV[2])) do
    local value = redis.call('HGET', locks, field)
    if value then
      local entry = decode(field, value)
      if entry.deadline > now and entry.state ~= RELEASED then
        table.insert(out, row(field, entry))
      end
    end
  end
end
return out
