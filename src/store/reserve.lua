-- Reserves one decision atomically: tries each candidate in order and
-- applies the first whose enforced counters all fit, all of its counters or
-- none. Time is the caller's (ARGV[1]); Redis TTLs only clean up.
--
-- KEYS[1]  reservation key       KEYS[2]  replay key (request id)
-- KEYS[3..] candidate by candidate: its counter keys, op by op, then the
--           grant key of each op that names one, in op order
-- ARGV: now, reservation ttl, reservation id, replay window (0 = none),
--       cleanup grace, candidate count, then per candidate: op count and
--       its reservation record, then per op: amount, limit, flags, expiry,
--       grant mode.
--   flags: 1 enforced, 2 downgradable, 4 concurrency gauge
--   grant mode: 0 none, 1 an active grant adds its extra to the limit,
--   2 as 1, and without an active grant the op blocks (an approval gate).
--   A grant key holds `<extra> <expires at>`.
--   expiry: 0 never, > 0 end of a calendar window (the key already names
--   the window, so this only sets the TTL), < 0 minus a rolling duration
--   that starts at first use
--
-- Counters are plain integers, except rolling ones (a hash of value `v`
-- and logical end `e`) and gauges (a sorted set of reservation ids scored
-- by when they lapse).
--
-- Returns {replayed (0/1), reservation id or '-', applied index or -1,
-- candidates tried, then per candidate tried: op count, then per op: used
-- before, resets_at or -1, granted extra or -1 (no active grant)}.

-- Lua prints large numbers in exponent form; integers leave through this.
local function int(x) return string.format('%d', x) end

local now = tonumber(ARGV[1])
local ttl = tonumber(ARGV[2])
local replay_ms = tonumber(ARGV[4])
local grace = tonumber(ARGV[5])

if replay_ms > 0 then
  local prev = redis.call('GET', KEYS[2])
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

local W = 5 -- ARGV fields per op
local ncand = tonumber(ARGV[6])
local a, k = 7, 3
local tried, applied = {}, -1
local starts = {}
for c = 1, ncand do
  local n = tonumber(ARGV[a])
  local grant_keys, g = {}, k + n
  for o = 0, n - 1 do
    if tonumber(ARGV[a + 2 + W * o + 4]) > 0 then
      grant_keys[o] = KEYS[g]
      g = g + 1
    end
  end
  starts[c] = {a = a + 2, k = k, n = n, record = ARGV[a + 1], grants = grant_keys}
  a = a + 2 + W * n
  k = g
end

-- The extra of the active grant at `key`, or -1.
local function granted(key)
  local v = redis.call('GET', key)
  if not v then return -1 end
  local sep = string.find(v, ' ', 1, true)
  if not sep or tonumber(string.sub(v, sep + 1)) <= now then return -1 end
  return tonumber(string.sub(v, 1, sep - 1))
end

for c = 1, ncand do
  local s = starts[c]
  local n = s.n
  -- One MGET for every plain counter of the candidate.
  local plain, plain_at = {}, {}
  for o = 0, n - 1 do
    local flags = tonumber(ARGV[s.a + W * o + 2])
    local exp = tonumber(ARGV[s.a + W * o + 3])
    if flags < 4 and exp >= 0 then
      plain[#plain + 1] = KEYS[s.k + o]
      plain_at[o] = #plain
    end
  end
  local values = {}
  if #plain > 0 then values = redis.call('MGET', unpack(plain)) end

  local states, blocked, only_downgradable = {}, false, true
  for o = 0, n - 1 do
    local key = KEYS[s.k + o]
    local base = s.a + W * o
    local amount, limit = tonumber(ARGV[base]), tonumber(ARGV[base + 1])
    local flags, exp = tonumber(ARGV[base + 2]), tonumber(ARGV[base + 3])
    local gmode = tonumber(ARGV[base + 4])
    local grant = -1
    if gmode > 0 then grant = granted(s.grants[o]) end
    local used, reset, fresh
    if flags >= 4 then
      redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
      used, reset, fresh = redis.call('ZCARD', key), -1, false
    elseif exp < 0 then
      local v = redis.call('HMGET', key, 'v', 'e')
      local e = tonumber(v[2])
      if v[1] and e > now then
        used, reset, fresh = tonumber(v[1]), e, false
      else
        used, reset, fresh = 0, now - exp, true
      end
    else
      local v = values[plain_at[o]]
      if v then used, fresh = tonumber(v), false else used, fresh = 0, true end
      reset = -1
    end
    states[o + 1] = {used, reset, fresh, grant}
    local gate_closed = gmode == 2 and grant < 0
    if grant > 0 then limit = limit + grant end
    if flags % 2 == 1 and (gate_closed or used + amount > limit) then
      blocked = true
      if flags % 4 < 2 then only_downgradable = false end
    end
  end
  tried[c] = states
  if not blocked then
    applied = c
    break
  end
  if not only_downgradable then break end
end

local rid = '-'
if applied > 0 then
  local s = starts[applied]
  rid = ARGV[3]
  for o = 0, s.n - 1 do
    local key = KEYS[s.k + o]
    local base = s.a + W * o
    local amount = ARGV[base]
    local flags, exp = tonumber(ARGV[base + 2]), tonumber(ARGV[base + 3])
    local fresh = tried[applied][o + 1][3]
    if flags >= 4 then
      redis.call('ZADD', key, int(now + ttl), rid)
      redis.call('PEXPIRE', key, int(ttl + grace))
    elseif exp < 0 then
      if fresh then
        redis.call('HSET', key, 'v', amount, 'e', int(now - exp))
        redis.call('PEXPIRE', key, int(grace - exp))
      else
        redis.call('HINCRBY', key, 'v', amount)
      end
    elseif fresh then
      if exp > 0 then
        redis.call('SET', key, amount, 'PX', int(math.max(exp - now, 1) + grace))
      else
        redis.call('SET', key, amount)
      end
    else
      redis.call('INCRBY', key, amount)
    end
  end
  -- Partial reservations across cluster slots pass no record; the caller
  -- stores it once every slot has fitted.
  if s.record ~= '' then
    redis.call('SET', KEYS[1], '0 ' .. int(now + ttl) .. '\n' .. s.record, 'PX', int(ttl + grace))
  end
end

-- Integers go back as integers; only a replay needs the text form.
local out = {0, rid, applied - 1, #tried}
for _, states in ipairs(tried) do
  out[#out + 1] = #states
  for _, st in ipairs(states) do
    out[#out + 1] = st[1]
    out[#out + 1] = st[2]
    out[#out + 1] = st[4]
  end
end
if replay_ms > 0 then
  local text = {}
  for i = 2, #out do text[i - 1] = type(out[i]) == 'number' and int(out[i]) or out[i] end
  redis.call('SET', KEYS[2], int(now + replay_ms) .. ' ' .. table.concat(text, ' '), 'PX', int(replay_ms + grace))
end
return out
