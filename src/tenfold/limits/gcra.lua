-- tenfold GCRA v1: one rate-limit decision, atomically, on the server's clock.
-- Must stay in step with tenfold/limits/gcra.py (same invariants, same EPSILON).
--
-- KEYS[1]  the subject's TAT key
-- ARGV[1]  emission interval T in seconds (period / limit)
-- ARGV[2]  tolerance in seconds (T * burst)
-- ARGV[3]  cost (>= 1)
-- returns  {allowed 0|1, remaining, retry_after_s (string), reset_after_s (string)}
local interval = tonumber(ARGV[1])
local tolerance = tonumber(ARGV[2])
local cost = tonumber(ARGV[3])
local epsilon = 1e-4  -- EPSILON_S in gcra.py: clock slack, see there

local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000

local stored = tonumber(redis.call('GET', KEYS[1]))
local base = now
if stored ~= nil and stored > now then
  base = stored
end
local new_tat = base + interval * cost
local allow_at = new_tat - tolerance

local function remaining(tat)
  local left = math.floor((tolerance - (tat - now) + epsilon) / interval)
  if left < 0 then
    return 0
  end
  return left
end

if now >= allow_at - epsilon then
  local ttl_ms = math.ceil((new_tat - now) * 1000) + 1
  redis.call('SET', KEYS[1], string.format('%.17g', new_tat), 'PX', ttl_ms)
  return {1, remaining(new_tat), '0', string.format('%.6f', new_tat - now)}
end
return {0, remaining(base), string.format('%.6f', allow_at - now), string.format('%.6f', base - now)}
