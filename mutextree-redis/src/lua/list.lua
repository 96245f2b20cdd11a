-- The live locks in a key range, in key order; changes nothing.
-- ARGV: ZRANGEBYLEX bounds. Returns {key, owner, token, remaining ms, transient}...
local out = {}
for _, key in ipairs(redis.call('ZRANGEBYLEX', index, ARGV[1], ARGV[2])) do
  local value = redis.call('HGET', locks, key)
  if value then
    local lock = decode(key, value)
    if lock.deadline > now and lock.state ~= RELEASED then
      table.insert(out, { key, lock.owner, lock.token, remaining(lock), lock.state })
    end
  end
end
return out
