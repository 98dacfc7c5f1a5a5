-- Reserves one decision atomically: tries each candidate in order and
-- applies the first whose enforced counters all fit, all of its counters or
-- none. Time is the caller's (ARGV[1]); Redis TTLs only clean up.
--
-- KEYS[1]  reservation key       KEYS[2]  replay key (request id)
-- KEYS[3..] candidate by candidate: its counter keys, op by op, then the
--           grant key of each op that names one, in op order
-- ARGV: now, reservation key lifetime (ms), reservation id, replay window
--       (0 = none), cleanup grace, candidate count, then per candidate: op
--       count and its reservation record ('' = none; stored as given),
--       then per op: amount, limit, mode, expiry.
--   mode: one character, '0' plus the sum of 1 enforced, 2 downgradable,
--   4 concurrency gauge, 8 rolling window, 16 if an active grant adds its
--   extra to the limit, 32 if in addition the op blocks without one (an
--   approval gate). A grant key holds `<extra> <expires at>`.
--   expiry: for a rolling window, its duration; for a gauge, how long a
--   slot lasts; otherwise how long from now a new counter's key lives (to
--   its window's end plus the grace; the key already names the window),
--   or 0 for never. Time is the caller's, so these are relative.
--
-- Counters are plain integers, except rolling ones (a hash of value `v`
-- and logical end `e`) and gauges (a sorted set of reservation ids scored
-- by when they lapse).
--
-- Returns {replayed (0/1), reservation id or '-', applied index or -1,
-- candidates tried, then per candidate tried: op count, then per op: used
-- before, resets_at or -1, granted extra or -1 (no active grant)}.
--
-- Costs, measured: each redis.call about 1.5 us, each tonumber() of an
-- argument about 0.2 us, everything else far less. So the common case
-- (plain counters, no grants, no request id) makes one MGET, one write per
-- counter and one SET of the reservation, and converts only the numbers it
-- compares; the mode is read with string.byte.

local tonumber, byte, call = tonumber, string.byte, redis.call

-- Lua prints large numbers in exponent form; integers leave through this.
local function int(x) return string.format('%d', x) end

local now = tonumber(ARGV[1])

if ARGV[4] ~= '0' then
  local prev = call('GET', KEYS[2])
  if prev then
    local sep = string.find(prev, ' ', 1, true)
    if tonumber(string.sub(prev, 1, sep - 1)) > now then
      -- The first token is the reservation id (or '-'), always text even
      -- when it looks like a number; the rest are integers.
      local out = {1}
      for token in string.gmatch(string.sub(prev, sep + 1), '%S+') do
        if #out == 1 then out[2] = token else out[#out + 1] = tonumber(token) end
      end
      return out
    end
  end
end

-- The extra of the active grant at `key`, or -1.
local function granted(key)
  local v = call('GET', key)
  if not v then return -1 end
  local sep = string.find(v, ' ', 1, true)
  if not sep or tonumber(string.sub(v, sep + 1)) <= now then return -1 end
  return tonumber(string.sub(v, 1, sep - 1))
end

local ncand = tonumber(ARGV[6])
local a, k = 7, 3          -- this candidate's first ARGV and KEYS index
local out, len = {0, '-', -1, 0}, 4
local applied, first, values, rolling_fresh

for c = 1, ncand do
  local n = tonumber(ARGV[a])
  first = a + 2
  a = first + 4 * n
  -- Gauges and rolling counters read nil here; they are read below.
  values = {}
  if n > 0 then values = call('MGET', unpack(KEYS, k, k + n - 1)) end
  rolling_fresh = nil

  out[4] = c
  len = len + 1
  out[len] = n
  local blocked, only_downgradable = false, true
  local g = k + n          -- the next grant key
  for o = 0, n - 1 do
    local base = first + 4 * o
    local mode = byte(ARGV[base + 2]) - 48
    local used, reset, grant = 0, -1, -1
    if mode % 32 >= 16 then
      grant = granted(KEYS[g])
      g = g + 1
    end
    if mode % 16 >= 8 then
      local v = call('HMGET', KEYS[k + o], 'v', 'e')
      local e = tonumber(v[2])
      if v[1] and e > now then
        used, reset = tonumber(v[1]), e
      else
        reset = now + tonumber(ARGV[base + 3])
        rolling_fresh = rolling_fresh or {}
        rolling_fresh[o] = true
      end
    elseif mode % 8 >= 4 then
      call('ZREMRANGEBYSCORE', KEYS[k + o], '-inf', now)
      used = call('ZCARD', KEYS[k + o])
    elseif values[o + 1] then
      used = tonumber(values[o + 1])
    end
    out[len + 1], out[len + 2], out[len + 3] = used, reset, grant
    len = len + 3
    if mode % 2 == 1 then
      local limit = tonumber(ARGV[base + 1])
      if grant > 0 then limit = limit + grant end
      if (mode >= 32 and grant < 0) or used + tonumber(ARGV[base]) > limit then
        blocked = true
        if mode % 4 < 2 then only_downgradable = false end
      end
    end
  end

  if not blocked then
    applied = c
    out[3] = c - 1
    break
  end
  if not only_downgradable then break end
  k = g
end

if applied then
  local rid = ARGV[3]
  out[2] = rid
  for o = 0, tonumber(ARGV[first - 2]) - 1 do
    local key = KEYS[k + o]
    local base = first + 4 * o
    local amount, exp = ARGV[base], ARGV[base + 3]
    local mode = byte(ARGV[base + 2]) - 48
    if mode % 16 >= 8 then
      if rolling_fresh and rolling_fresh[o] then
        local span = tonumber(exp)
        call('HSET', key, 'v', amount, 'e', int(now + span))
        call('PEXPIRE', key, int(tonumber(ARGV[5]) + span))
      else
        call('HINCRBY', key, 'v', amount)
      end
    elseif mode % 8 >= 4 then
      call('ZADD', key, int(now + tonumber(exp)), rid)
      call('PEXPIRE', key, ARGV[2])
    elseif values[o + 1] or exp == '0' then
      call('INCRBY', key, amount)
    else
      call('SET', key, amount, 'PX', exp)
    end
  end
  -- Partial reservations across cluster slots pass no record; the caller
  -- stores it once every slot has fitted.
  local record = ARGV[first - 1]
  if record ~= '' then
    call('SET', KEYS[1], record, 'PX', ARGV[2])
  end
end

if ARGV[4] ~= '0' then
  local text = {}
  for i = 2, len do text[i - 1] = type(out[i]) == 'number' and int(out[i]) or out[i] end
  call('SET', KEYS[2], int(now + tonumber(ARGV[4])) .. ' ' .. table.concat(text, ' '), 'PX', int(tonumber(ARGV[4]) + tonumber(ARGV[5])))
end
return out
