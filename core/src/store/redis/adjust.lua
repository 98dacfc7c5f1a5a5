-- Moves counters by a delta each: used to undo a partial reservation
-- across cluster slots, and to settle one.
-- KEYS: counter keys (one slot). ARGV: now, reservation id, then per key:
-- kind (p plain, r rolling, g gauge) and delta.
local now = tonumber(ARGV[1])
local rid = ARGV[2]
for i, key in ipairs(KEYS) do
  move_counter(ARGV[1 + 2 * i], key, tonumber(ARGV[2 + 2 * i]), now, rid)
end
return 'ok'
