-- Reads, keeps or forgets one request id's outcome, for what cannot do it
-- inside its own script: a reserve across cluster slots, and a withdrawn
-- reservation (whose retry must be decided afresh).
--
-- KEYS: the request id's replay hashes, less their bucket number (see
--       ReplaySpot in keys.rs), one per window it may be kept for.
-- ARGV: now, what to do, the outcome's text ('' unless keeping it), then
--       per key its spot, as reserve.lua's ARGV[4] takes it:
--   'get'     the outcome in KEYS[1]'s buckets still valid at now (its
--             text begins with when it stops being valid), or false
--   'set'     keeps the text in KEYS[1]'s bucket to write; returns 1
--   'forget'  removes the id from every bucket of every key; returns how
--             many it removed

local now = tonumber(ARGV[1])
local function spot(n)
  local s = {}
  for token in string.gmatch(ARGV[3 + n], '%S+') do s[#s + 1] = token end
  return s
end

if ARGV[2] == 'get' then
  local s = spot(1)
  for b = tonumber(s[2]), tonumber(s[3]) do
    local prev = redis.call('HGET', KEYS[1] .. string.format('%d', b), s[6])
    local sep = prev and string.find(prev, ' ', 1, true)
    if sep and tonumber(string.sub(prev, 1, sep - 1)) > now then return prev end
  end
  return false
elseif ARGV[2] == 'set' then
  local s = spot(1)
  local key = KEYS[1] .. s[4]
  redis.call('HSET', key, s[6], ARGV[3])
  redis.call('PEXPIRE', key, s[5])
  return 1
end
local removed = 0
for n = 1, #KEYS do
  local s = spot(n)
  for b = tonumber(s[2]), tonumber(s[3]) do
    removed = removed + redis.call('HDEL', KEYS[n] .. string.format('%d', b), s[6])
  end
end
return removed
