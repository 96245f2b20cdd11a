-- Grants one Exclusive item, or reports the live entry in the way: the
-- request most are, so its script defines only what it uses (common.lua,
-- the_way.lua), since Redis runs a script's whole text on every call.
-- ARGV as grant.lua's: scope ("tree" or "key"), ttl ms, state (0 held, 1
-- transient), nonce, owner, the item's key and mode (exclusive).
-- Returns {1, token, ttl ms} or {0, {key, owner, token, remaining ms,
-- state, mode}}.
local tree, ttl, state, nonce, owner, key =
  ARGV[1] == 'tree', tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[4], ARGV[5], ARGV[6]

local field, entry = in_the_way(key, EXCLUSIVE, tree, nil)
if field then
  -- Its own entry, which carries the nonce, is in its way when it is sent
  -- again after a lost reply: the same grant. No record needed.
  if field == key and entry.nonce == nonce then
    return { 1, entry.token, remaining(entry) }
  end
  return { 0, row(field, entry) }
end

local token = redis.call('INCR', counter)
write_entry(key, index, now + ttl * 1000, token, state, nonce, owner)
-- Bounded sweep, so that entries nobody looks at again cannot pile up: the
-- grant adds one entry, and every 16th removes up to 64 expired ones.
if token % 16 == 0 then
  sweep(64)
end
return { 1, token, ttl }
