-- Drops a grant from the listing only if it is still the record read, so
-- a grant made meanwhile is never dropped with the lapsed one.
-- KEYS[1]: the grants hash. ARGV[1]: the grant's key, ARGV[2]: the record
-- as read. Returns 1 if dropped, 0 if not.
if redis.call('HGET', KEYS[1], ARGV[1]) == ARGV[2] then
  return redis.call('HDEL', KEYS[1], ARGV[1])
end
return 0
