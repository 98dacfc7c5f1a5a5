-- Settles a reservation once: each counter moves by (actual - reserved),
-- never below zero, and concurrency slots are given back.
--
-- KEYS[1]   reservation key
-- KEYS[2..] the reservation's counter keys, in its own order
-- ARGV: now, reservation id, how long a settled reservation is kept (ms),
--       its key's lifetime then (ms), then the actual amount for each
--       counter
-- Returns 'settled', 'already_settled' or 'unknown'.
--
-- A reservation is "<settled 0|1> <expires at>\n<model>\n" followed by one
-- line per counter: "<p|r|g>\t<unit>\t<reserved amount>\t<key>" (plain,
-- rolling, gauge).

local now = tonumber(ARGV[1])
local rid = ARGV[2]
local r = redis.call('GET', KEYS[1])
if not r then return 'unknown' end
local settled, expires = string.match(r, '^(%d) (%d+)\n')
if tonumber(expires) <= now then return 'unknown' end
if settled == '1' then return 'already_settled' end

local i = 0
for kind, amount, key in string.gmatch(r, '\n([prg])\t[^\t]*\t([^\t]*)\t([^\n]*)') do
  i = i + 1
  if key ~= KEYS[i + 1] then
    return redis.error_reply('settle keys do not match the reservation')
  end
  move_counter(kind, key, tonumber(ARGV[i + 4]) - tonumber(amount), now, rid)
end
-- Settled, the reservation is kept only long enough to recognise a
-- repeated settle (ARGV[3]), not for its whole life: under load,
-- reservations are most of the store's keys.
local keep = now + tonumber(ARGV[3])
if keep < tonumber(expires) then
  local rest = string.sub(r, #expires + 4)
  redis.call('SET', KEYS[1], '1 ' .. string.format('%d', keep) .. '\n' .. rest, 'PX', ARGV[4])
else
  redis.call('SETRANGE', KEYS[1], 0, '1')
end
return 'settled'
