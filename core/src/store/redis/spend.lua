-- Adds one day's spend-account deltas, all of them or none.
--
-- KEYS[1]  the day's rows: a hash of row id -> the row's dimensions
-- KEYS[2]  the day's values: a hash of '<row id>:<s|e><field>' -> integer
--          (s settled, e estimated; field 0..9 as in SpendEntry, spend
--          split into whole microdollars (8) and picodollars left (9))
-- KEYS[3]  the day's folded rows: a HyperLogLog of row ids
-- KEYS[4]  this batch's marker: a batch sent again (its answer was lost)
--          finds it and adds nothing; it lives as long as the day's keys
-- ARGV: most rows a day keeps, the keys' lifetime (ms), the `other` row's
--       dimensions, then per delta: row id, dimensions, s or e, and its
--       ten values.
-- A row new on its day once the day holds its most rows is added to the
-- row 'other' instead, and counted in KEYS[3].
-- Returns the number of deltas folded, or -1 for a batch already added.

local call = redis.call
if call('SET', KEYS[4], '1', 'NX', 'PX', ARGV[2]) == false then return -1 end
local max = tonumber(ARGV[1])
local folded = 0
local i = 4
while i <= #ARGV do
  local row = ARGV[i]
  if call('HEXISTS', KEYS[1], row) == 0 then
    if call('HLEN', KEYS[1]) >= max then
      call('PFADD', KEYS[3], row)
      folded = folded + 1
      row = 'other'
      call('HSETNX', KEYS[1], row, ARGV[3])
    else
      call('HSET', KEYS[1], row, ARGV[i + 1])
    end
  end
  local prefix = row .. ':' .. ARGV[i + 2]
  for f = 0, 9 do
    local v = ARGV[i + 3 + f]
    if v ~= '0' then call('HINCRBY', KEYS[2], prefix .. f, v) end
  end
  i = i + 13
end
for k = 1, 3 do
  if call('EXISTS', KEYS[k]) == 1 then call('PEXPIRE', KEYS[k], ARGV[2]) end
end
return folded
