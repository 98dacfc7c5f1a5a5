-- Writes one batch of what a leasing replica kept back from its decisions,
-- all in one slot: reservation records, request-id outcomes, counter moves
-- (settles decided in the replica that its leases could not absorb), and
-- unused leases handed back.
--
-- KEYS: one per item, in item order.
-- ARGV: now, replica, then per item: its kind and its arguments:
--   'r' text, lifetime (ms)   SET the reservation record
--   'q' text, lifetime (ms)   SET the request id's outcome unless one is
--                             there: another replica decided it first
--   'm' kind, delta           move the counter (see move_counter.lua)
--   'l' unused                give back `unused` of the replica's lease
--   'u' unused, until         the replica's lease now holds `unused`
-- Returns the ordinals (1-based, among 'q' items) of the request ids that
-- another replica had decided already: the replica takes its own
-- decision's charge back.

local now = tonumber(ARGV[1])
local replica = ARGV[2]
local a, q, dup = 3, 0, {}

for i, key in ipairs(KEYS) do
  local kind = ARGV[a]
  if kind == 'r' then
    redis.call('SET', key, ARGV[a + 1], 'PX', ARGV[a + 2])
    a = a + 3
  elseif kind == 'q' then
    q = q + 1
    if not redis.call('SET', key, ARGV[a + 1], 'PX', ARGV[a + 2], 'NX') then
      dup[#dup + 1] = q
    end
    a = a + 3
  elseif kind == 'm' then
    move_counter(ARGV[a + 1], key, tonumber(ARGV[a + 2]), now, '')
    a = a + 3
  else
    local brace = string.find(key, '{', 1, true)
    local lkey = string.sub(key, 1, brace - 3) .. 'l:' .. string.sub(key, brace)
    if kind == 'l' then
      move_counter('p', key, -tonumber(ARGV[a + 1]), now, '')
      redis.call('HDEL', lkey, replica)
      a = a + 2
    else
      if ARGV[a + 1] == '0' then
        redis.call('HDEL', lkey, replica)
      elseif redis.call('HEXISTS', lkey, replica) == 1 then
        redis.call('HSET', lkey, replica, ARGV[a + 1] .. ' ' .. ARGV[a + 2])
      end
      a = a + 3
    end
  end
end
return dup
