-- Writes one batch of what a leasing replica kept back from its decisions,
-- all in one slot: reservation records, request-id outcomes, counter moves
-- (settles decided in the replica that its leases could not absorb), and
-- unused leases handed back.
--
-- KEYS[1]: the batch's own key: once the batch is applied it holds the
--          reply, so that a batch sent again (its first reply was lost)
--          is applied once and answered the same.
-- KEYS[2..]: one per item, in item order.
-- ARGV: now, replica, then per item: its kind and its arguments:
--   'r' text, lifetime (ms)   SET the reservation record
--   'q' buckets, n, then n    request ids of one replay hash (the key is
--       fields and outcomes   its name less the bucket number, buckets as
--                             in reserve.lua's ARGV[4] less the field):
--                             each is kept unless an outcome valid when
--                             this replica decided it (its own outcome's
--                             time less the window) is there: another
--                             replica decided it first
--   'm' kind, delta           move the counter (see move_counter.lua)
--   'l' unused, until         give back `unused` of the replica's lease
--                             whose entry lapses at `until`
--   'u' unused, until         that lease now holds `unused`
-- A lease's entry in `l:{..}` (see reserve.lua) is named by its `until`,
-- which each refill rewrites. A return or a report is about the entry of
-- its `until` only: one still in flight when a refill rewrote the entry
-- (or sent again after a failed batch) must not overwrite or delete the
-- newer lease's. A report for another entry is dropped (the newer entry
-- is at least as recent); a return for another entry lowers it by the
-- amount given back (not below 0, and never deletes it), since a refill
-- that added to a live entry counted it there.
-- Returns the ordinals (1-based, among the request ids of the 'q' items)
-- of those another replica had decided already: the replica takes its own
-- decision's charge back.
--
-- The ids of one hash cost one HMGET per bucket read and one HSET, not a
-- command each: most of what a replica's batch asks of Redis.

local done = redis.call('GET', KEYS[1])
if done then
  local again = {}
  for n in string.gmatch(done, '%d+') do again[#again + 1] = tonumber(n) end
  return again
end

local now = tonumber(ARGV[1])
local replica = ARGV[2]
local a, q, dup = 3, 0, {}

for i = 2, #KEYS do
  local key = KEYS[i]
  local kind = ARGV[a]
  if kind == 'r' then
    redis.call('SET', key, ARGV[a + 1], 'PX', ARGV[a + 2])
    a = a + 3
  elseif kind == 'q' then
    local s = {}
    for token in string.gmatch(ARGV[a + 1], '%S+') do s[#s + 1] = token end
    local n = tonumber(ARGV[a + 2])
    local window = tonumber(s[1])
    local fields, decided, taken, seen = {}, {}, {}, {}
    for f = 1, n do
      local field, mine = ARGV[a + 1 + 2 * f], ARGV[a + 2 + 2 * f]
      -- Twice in one batch: the later one is the repeat.
      if seen[field] then taken[f] = true end
      fields[f], seen[field] = field, true
      -- Judged at when this replica decided it (its outcome is valid from
      -- then for the window), not at this batch's time, which is later.
      decided[f] = tonumber(string.sub(mine, 1, string.find(mine, ' ', 1, true) - 1)) - window
    end
    for b = tonumber(s[2]), tonumber(s[3]) do
      local found = redis.call('HMGET', key .. string.format('%d', b), unpack(fields))
      for f = 1, n do
        local v = found[f]
        local sep = v and string.find(v, ' ', 1, true)
        if sep and tonumber(string.sub(v, 1, sep - 1)) > decided[f] then taken[f] = true end
      end
    end
    local put = {}
    for f = 1, n do
      q = q + 1
      if taken[f] then
        dup[#dup + 1] = q
      else
        put[#put + 1] = fields[f]
        put[#put + 1] = ARGV[a + 2 + 2 * f]
      end
    end
    if #put > 0 then
      local written = key .. s[4]
      redis.call('HSET', written, unpack(put))
      redis.call('PEXPIRE', written, s[5])
    end
    a = a + 3 + 2 * n
  elseif kind == 'm' then
    move_counter(ARGV[a + 1], key, tonumber(ARGV[a + 2]), now, '')
    a = a + 3
  else
    local brace = string.find(key, '{', 1, true)
    local lkey = string.sub(key, 1, brace - 3) .. 'l:' .. string.sub(key, brace)
    local amount, ends = tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2])
    local entry = redis.call('HGET', lkey, replica)
    local sep = entry and string.find(entry, ' ', 1, true)
    local held, held_until
    if sep then
      held, held_until = tonumber(string.sub(entry, 1, sep - 1)), string.sub(entry, sep + 1)
    end
    local same = held_until and tonumber(held_until) == ends
    if kind == 'l' then
      move_counter('p', key, -amount, now, '')
      if same then
        redis.call('HDEL', lkey, replica)
      elseif held then
        -- Kept, even at 0: the newer lease's reports name it.
        redis.call('HSET', lkey, replica,
          string.format('%d', math.max(held - amount, 0)) .. ' ' .. held_until)
      end
    elseif same then
      if amount == 0 then
        redis.call('HDEL', lkey, replica)
      else
        redis.call('HSET', lkey, replica, ARGV[a + 1] .. ' ' .. held_until)
      end
    end
    a = a + 3
  end
end
-- Kept well past any resend (a failed batch is sent again at the next
-- flush, 20 ms later, until Redis answers).
redis.call('SET', KEYS[1], 'd ' .. table.concat(dup, ' '), 'PX', 600000)
return dup
