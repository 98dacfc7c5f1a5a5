-- Reserves one decision atomically: tries each candidate in order and
-- applies the first whose enforced counters all fit, all of its counters or
-- none. Time is the caller's (ARGV[1]); Redis TTLs only clean up.
--
-- KEYS[1]  reservation key
-- KEYS[2]  the request id's replay hashes, less their bucket number (see
--          ReplaySpot in keys.rs; a bucket's key is this and its number)
-- KEYS[3..] candidate by candidate: its counter keys, op by op, then the
--           grant key of each op that names one, in op order
-- ARGV: now, reservation key lifetime (ms), reservation id, replay ('0' =
--       none, else '<window> <first bucket> <last bucket> <bucket to
--       write> <its lifetime ms> <field>': the outcome is looked for in
--       the buckets from first to last and kept in the one to write,
--       valid for the window), cleanup grace, candidate count, lease spec ('' = no
--       leases), then per candidate: op count and its reservation record
--       ('' = none; stored as given), then per op: amount, limit, mode,
--       expiry, and with leases also: unused, want, alert values, life.
--   lease spec: '<replica> <longest lease life ms> <share>' (see Leases
--   below).
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
-- before, resets_at or -1, granted extra or -1 (no active grant)}; with
-- leases, then per op of the last candidate tried: the lease granted;
-- then the number of its enforced ops that blocked only because of other
-- replicas' unused leases (early denials), and of those that blocked only
-- because of this replica's own lease, granted by a refill whose answer
-- it has not read yet (it waits for that answer and decides again).
--
-- Leases (only for a request with one candidate). A replica's lease on a
-- plain counter is an amount already added to the counter on its behalf,
-- which it spends in its own process. `unused` is what the replica holds
-- and gives back now: the counter's usage is its value less `unused`, and
-- the counter drops by `unused` whether or not the candidate applies.
-- `want` is the lease the replica asks for; it gets it whole while that is
-- at most 1/share of the room left below the cap and below the next alert
-- value (space-separated, ascending, in `alert values`), and nothing after,
-- so that near a cap or a threshold decisions come here one at a time.
-- `life` is how long the replica will use it (ms; the replica chooses it,
-- longer only far from the cap). Each replica's lease is listed in the
-- hash `l:{..}` beside the counter (field: replica, value '<amount>
-- <until>'), for reports, for telling early denials apart, and for taking
-- back the lease of a replica that died holding it: an entry a longest
-- lease life and the cleanup grace past its end is reclaimed by the next
-- decision it blocks (see reclaim). The hash lives as long as its
-- counter. The counter alone keeps the cap.
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

local replay
if ARGV[4] ~= '0' then
  replay = {}
  for token in string.gmatch(ARGV[4], '%S+') do replay[#replay + 1] = token end
  for b = tonumber(replay[2]), tonumber(replay[3]) do
    local prev = call('HGET', KEYS[2] .. int(b), replay[6])
    local sep = prev and string.find(prev, ' ', 1, true)
    if sep and tonumber(string.sub(prev, 1, sep - 1)) > now then
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
local lease = ARGV[7] ~= ''
local per = lease and 8 or 4
local replica, lease_life, share
if lease then
  local spec = {}
  for token in string.gmatch(ARGV[7], '%S+') do spec[#spec + 1] = token end
  replica, lease_life, share = spec[1], tonumber(spec[2]), tonumber(spec[3])
end
local a, k = 8, 3          -- this candidate's first ARGV and KEYS index
local out, len = {0, '-', -1, 0}, 4
local applied, first, values, rolling_fresh, ck
-- With leases, per op of the candidate: unused given back, usage (less
-- the unused), limit in force; and the early denials.
local unused_of, used_of, limit_of, early, own_blocked = {}, {}, {}, 0, 0

-- `<prefix>l:{tag}<key>` beside the counter `<prefix>c:{tag}<key>`: the
-- prefix holds no `{`, so the first one opens the tag.
local function lease_key(key)
  local brace = string.find(key, '{', 1, true)
  return string.sub(key, 1, brace - 3) .. 'l:' .. string.sub(key, brace)
end

-- What other replicas, and this one, hold of a counter in live leases.
local function leased(key)
  local others, own, fields = 0, 0, call('HGETALL', lease_key(key))
  for i = 1, #fields, 2 do
    local sep = string.find(fields[i + 1], ' ', 1, true)
    if tonumber(string.sub(fields[i + 1], sep + 1)) > now then
      local held = tonumber(string.sub(fields[i + 1], 1, sep - 1))
      if fields[i] == replica then own = own + held else others = others + held end
    end
  end
  return others, own
end

-- Gives back the leases on counter `key` of replicas that died holding
-- them. A live replica stops using a lease a margin before its end and
-- gives it back at its next batch (20 ms), deleting its entry; an entry
-- still there a longest lease life and the cleanup grace (ARGV[5], 60 s)
-- after its end is a dead replica's. The amount is what that replica
-- last reported holding: what it decided after its last report (at most
-- 250 ms of its decisions) is then not counted. Returns what was given
-- back, at most `value`, the counter's value.
local function reclaim(key, value)
  local lkey, back = lease_key(key), 0
  local dead_before = now - lease_life - tonumber(ARGV[5])
  local fields = call('HGETALL', lkey)
  for i = 1, #fields, 2 do
    if fields[i] ~= replica then
      local sep = string.find(fields[i + 1], ' ', 1, true)
      if tonumber(string.sub(fields[i + 1], sep + 1)) <= dead_before then
        back = back + tonumber(string.sub(fields[i + 1], 1, sep - 1))
        call('HDEL', lkey, fields[i])
      end
    end
  end
  back = math.min(back, value)
  if back > 0 then call('DECRBY', key, int(back)) end
  return back
end

for c = 1, ncand do
  local n = tonumber(ARGV[a])
  ck = k
  first = a + 2
  a = first + per * n
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
    local base = first + per * o
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
    if lease then
      -- A lease on a counter that has gone (its window ended) went with it.
      local unused = 0
      if mode % 16 < 4 and values[o + 1] then
        unused = math.min(tonumber(ARGV[base + 4]), used)
      end
      used = used - unused
      unused_of[o], used_of[o] = unused, used
    end
    out[len + 1], out[len + 2], out[len + 3] = used, reset, grant
    len = len + 3
    if mode % 2 == 1 then
      local limit = tonumber(ARGV[base + 1])
      if grant > 0 then limit = limit + grant end
      if lease then limit_of[o] = limit end
      if lease and mode % 16 < 4 and values[o + 1] and not (mode >= 32 and grant < 0)
          and used + tonumber(ARGV[base]) > limit then
        -- Blocked: first take back what dead replicas' leases hold.
        local back = reclaim(KEYS[k + o], used)
        if back > 0 then
          used = used - back
          used_of[o] = used
          out[len - 2] = used
        end
      end
      if (mode >= 32 and grant < 0) or used + tonumber(ARGV[base]) > limit then
        blocked = true
        if mode % 4 < 2 then only_downgradable = false end
        if lease and not (mode >= 32 and grant < 0) and mode % 16 < 4 then
          local others, own = leased(KEYS[k + o])
          local amount = tonumber(ARGV[base])
          if used - others + amount <= limit then early = early + 1 end
          if own > 0 and used - own + amount <= limit then own_blocked = own_blocked + 1 end
        end
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

-- The lease op `o` gets once its own amount is added: what it asked for,
-- if that is at most 1/share of the room below the cap and the next alert
-- value; otherwise none.
local function lease_for(o, base)
  local want = tonumber(ARGV[base + 5])
  if want <= 0 then return 0 end
  local amount = tonumber(ARGV[base])
  local value = used_of[o] + amount
  local ceiling = limit_of[o]
  for stop in string.gmatch(ARGV[base + 6], '%S+') do
    stop = tonumber(stop)
    if stop > value then
      if not ceiling or stop - 1 < ceiling then ceiling = stop - 1 end
      break
    end
  end
  if not ceiling then return want end
  -- Whole or none: within `share` leases of a cap or a threshold, every
  -- decision comes here, one at a time, and fills it exactly.
  if math.floor((ceiling - value) / share) < want then return 0 end
  return want
end

-- Records replica's lease on counter `key` (none when `amount` is 0),
-- used for `life` ms. `adds`: the replica gave nothing back (a top-up or
-- a renewal), so it still holds what its live entry last said, and the
-- grant is added to that: an entry naming the grant alone would have a
-- replica that dies before its next report reclaimed short, and the cap
-- never fill. (Its last report may be up to 250 ms stale, as for any
-- reclaim.)
-- The hash lives as long as the counter (`exp`, as an op's expiry: 0 for
-- never), so that a dead replica's entry stays until it is reclaimed.
local function note_lease(key, amount, life, exp, adds)
  local lkey = lease_key(key)
  if amount > 0 then
    if adds then
      local prev = call('HGET', lkey, replica)
      local sep = prev and string.find(prev, ' ', 1, true)
      if sep and tonumber(string.sub(prev, sep + 1)) > now then
        amount = amount + tonumber(string.sub(prev, 1, sep - 1))
      end
    end
    call('HSET', lkey, replica, int(amount) .. ' ' .. int(now + tonumber(life)))
    if exp == '0' then
      call('PERSIST', lkey)
    else
      call('PEXPIRE', lkey, int(math.max(tonumber(exp), lease_life + tonumber(ARGV[5]))))
    end
  else
    call('HDEL', lkey, replica)
  end
end

local leased = {}
if applied then
  local rid = ARGV[3]
  out[2] = rid
  for o = 0, tonumber(ARGV[first - 2]) - 1 do
    local key = KEYS[k + o]
    local base = first + per * o
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
    else
      if lease then
        local got = lease_for(o, base)
        leased[o + 1] = got
        amount = int(tonumber(amount) - unused_of[o] + got)
        if got > 0 or unused_of[o] > 0 then
          note_lease(key, got, ARGV[base + 7], exp, unused_of[o] == 0)
        end
      end
      if values[o + 1] or exp == '0' then
        call('INCRBY', key, amount)
      else
        call('SET', key, amount, 'PX', exp)
      end
    end
  end
  -- Partial reservations across cluster slots pass no record; the caller
  -- stores it once every slot has fitted.
  local record = ARGV[first - 1]
  if record ~= '' then
    call('SET', KEYS[1], record, 'PX', ARGV[2])
  end
elseif lease then
  -- Refused: what the replica gave back is given back all the same.
  for o = 0, tonumber(ARGV[first - 2]) - 1 do
    if (unused_of[o] or 0) > 0 then
      call('DECRBY', KEYS[ck + o], int(unused_of[o]))
      note_lease(KEYS[ck + o], 0, 0)
    end
  end
end

if replay then
  local text = {}
  for i = 2, len do text[i - 1] = type(out[i]) == 'number' and int(out[i]) or out[i] end
  local key = KEYS[2] .. replay[4]
  call('HSET', key, replay[6], int(now + tonumber(replay[1])) .. ' ' .. table.concat(text, ' '))
  call('PEXPIRE', key, replay[5])
end
if lease then
  for o = 1, tonumber(ARGV[first - 2]) do
    out[len + o] = leased[o] or 0
  end
  out[#out + 1] = early
  out[#out + 1] = own_blocked
end
return out
