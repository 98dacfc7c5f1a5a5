-- Marks a reservation settled, once, before a settle across cluster slots
-- moves each slot with adjust.lua.
-- KEYS[1]: reservation. ARGV: now, how long a settled reservation is kept
-- (ms), its key's lifetime then (ms).
-- Returns 'unknown', 'already_settled', or the reservation as it was.
local r = redis.call('GET', KEYS[1])
if not r then return 'unknown' end
local settled, expires = string.match(r, '^(%d) (%d+)\n')
if tonumber(expires) <= tonumber(ARGV[1]) then return 'unknown' end
if settled == '1' then return 'already_settled' end
-- As in settle.lua: kept settled only long enough to recognise a repeat.
local keep = tonumber(ARGV[1]) + tonumber(ARGV[2])
if keep < tonumber(expires) then
  local rest = string.sub(r, #expires + 4)
  redis.call('SET', KEYS[1], '1 ' .. string.format('%d', keep) .. '\n' .. rest, 'PX', ARGV[3])
else
  redis.call('SETRANGE', KEYS[1], 0, '1')
end
return r
