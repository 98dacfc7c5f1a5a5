-- Reserves one decision atomically: tries each candidate in order and
-- applies the first whose enforced counters all fit, all of its counters or
-- none. Time is the caller's logical time (ARGV[1]); Redis TTLs only clean
-- up, they never decide.
--
-- KEYS[1]  reservation hash      KEYS[2]  replay key (request id)
-- KEYS[3..] counter keys, candidate by candidate, op by op
-- ARGV: now, reservation ttl, reservation id, replay window (0 = none),
--       cleanup grace, candidate count, then per candidate: op count, model,
--       then per op: amount, limit, enforced, downgradable, expiry kind
--       (n = never, t = at time, a = after first use), expiry value,
--       gauge (1 = concurrency slot), unit
--
-- Returns {replayed (0/1), result} where result is
-- "<reservation id or -> <applied index or -1> <tried> (<ops> (<used> <resets_at or -1>)*)*"

-- Lua prints large numbers in exponent form, so integers leave the script
-- through this.
local function int(x) return string.format('%d', x) end

local now = tonumber(ARGV[1])
local ttl = tonumber(ARGV[2])
local rid = ARGV[3]
local replay_ms = tonumber(ARGV[4])
local grace = tonumber(ARGV[5])

if replay_ms > 0 then
  local prev = redis.call('GET', KEYS[2])
  if prev then
    local sep = string.find(prev, ' ', 1, true)
    if tonumber(string.sub(prev, 1, sep - 1)) > now then
      return {1, string.sub(prev, sep + 1)}
    end
  end
end

local candidates = {}
local a, k = 7, 3
for c = 1, tonumber(ARGV[6]) do
  local n = tonumber(ARGV[a])
  local cand = {model = ARGV[a + 1], ops = {}}
  a = a + 2
  for o = 1, n do
    cand.ops[o] = {
      key = KEYS[k],
      amount = tonumber(ARGV[a]),
      amount_text = ARGV[a],
      limit = tonumber(ARGV[a + 1]),
      enforced = ARGV[a + 2] == '1',
      down = ARGV[a + 3] == '1',
      kind = ARGV[a + 4],
      exp = tonumber(ARGV[a + 5]),
      gauge = ARGV[a + 6] == '1',
      unit = ARGV[a + 7],
    }
    a = a + 8
    k = k + 1
  end
  candidates[c] = cand
end

-- Current value and known reset of one counter; expired counters read 0.
local function state(op)
  if op.gauge then
    redis.call('ZREMRANGEBYSCORE', op.key, '-inf', now)
    return redis.call('ZCARD', op.key), -1, false
  end
  local v = redis.call('HMGET', op.key, 'v', 'e')
  local used, e = tonumber(v[1]), tonumber(v[2])
  if used == nil or (e > 0 and e <= now) then
    if op.kind == 'a' then return 0, now + op.exp, true end
    return 0, -1, true
  end
  if op.kind == 'a' then return used, e, false end
  return used, -1, false
end

local tried, applied = {}, -1
for c, cand in ipairs(candidates) do
  local states, blocked, only_downgradable = {}, false, true
  for i, op in ipairs(cand.ops) do
    local used, reset, fresh = state(op)
    states[i] = {used, reset, fresh}
    if op.enforced and used + op.amount > op.limit then
      blocked = true
      if not op.down then only_downgradable = false end
    end
  end
  tried[c] = states
  if not blocked then
    applied = c
    break
  end
  if not only_downgradable then break end
end

if applied > 0 then
  local cand = candidates[applied]
  local record = {}
  for i, op in ipairs(cand.ops) do
    if op.gauge then
      redis.call('ZADD', op.key, int(now + ttl), rid)
      redis.call('PEXPIRE', op.key, int(ttl + grace))
    elseif tried[applied][i][3] then
      local exp = 0
      if op.kind == 't' then exp = op.exp elseif op.kind == 'a' then exp = now + op.exp end
      redis.call('HSET', op.key, 'v', op.amount_text, 'e', int(exp))
      if exp > 0 then
        redis.call('PEXPIRE', op.key, int(math.max(exp - now, 1) + grace))
      else
        redis.call('PERSIST', op.key)
      end
    else
      redis.call('HINCRBY', op.key, 'v', op.amount_text)
    end
    record[i] = op.unit .. '\t' .. op.amount_text .. '\t' .. (op.gauge and '1' or '0') .. '\t' .. op.key
  end
  redis.call('HSET', KEYS[1], 'm', cand.model, 's', '0', 'x', int(now + ttl), 'o', table.concat(record, '\n'))
  redis.call('PEXPIRE', KEYS[1], int(ttl + grace))
end

local out = {applied > 0 and rid or '-', int(applied - 1), int(#tried)}
for _, states in ipairs(tried) do
  out[#out + 1] = int(#states)
  for _, s in ipairs(states) do
    out[#out + 1] = int(s[1])
    out[#out + 1] = int(s[2])
  end
end
local result = table.concat(out, ' ')
if replay_ms > 0 then
  redis.call('SET', KEYS[2], int(now + replay_ms) .. ' ' .. result, 'PX', int(replay_ms + grace))
end
return {0, result}
