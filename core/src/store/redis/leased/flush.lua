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
--   'q' text, lifetime (ms)   SET the request id's outcome unless one is
--                             there: another replica decided it first
--   'm' kind, delta           move the counter (see move_counter.lua)
--   'l' unused                give back `unused` of the replica's lease
--   'u' unused, until         the replica's lease now holds `unused`
-- Returns the ordinals (1-based, among 'q' items) of the request ids that
-- another replica had decided already: the replica takes its own
-- decision's charge back.

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
-- Kept well past any resend (a failed batch is sent again at the next
-- flush, 20 ms later, until Redis answers).
redis.call('SET', KEYS[1], 'd ' .. table.concat(dup, ' '), 'PX', 600000)
return dup
