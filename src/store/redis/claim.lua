-- Marks a reservation settled, once. KEYS[1]: reservation. ARGV[1]: now.
-- Returns 'unknown', 'already_settled', or the reservation as it was.
local r = redis.call('GET', KEYS[1])
if not r then return 'unknown' end
local settled, expires = string.match(r, '^(%d) (%d+)\n')
if tonumber(expires) <= tonumber(ARGV[1]) then return 'unknown' end
if settled == '1' then return 'already_settled' end
-- As in settle.lua: kept settled for a minute only.
local keep = tonumber(ARGV[1]) + 60000
if keep < tonumber(expires) then
  local rest = string.sub(r, #expires + 4)
  redis.call('SET', KEYS[1], '1 ' .. string.format('%d', keep) .. '\n' .. rest, 'PX', 120000)
else
  redis.call('SETRANGE', KEYS[1], 0, '1')
end
return r
