-- Stagecraft's run store on Redis: every state change of a run is one call of this script, so
-- each is atomic, and every worker write checks the run's fencing token in the same call.
--
-- ARGV[1] is the key prefix, ARGV[2] the operation, the rest its arguments. Times come from the
-- Redis server's clock (TIME), so processes on different hosts agree on lease expiry.
-- The work of every call is bounded: claims look at the head of each queue, sweeps and purges
-- take a limit.

local P = ARGV[1]
local op = ARGV[2]

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)

local function k_run(id) return P .. 'run:' .. id end
local function k_stage(id, i) return P .. 'run:' .. id .. ':stage:' .. i end
local function k_steps(id) return P .. 'run:' .. id .. ':steps' end
local function k_events(id) return P .. 'run:' .. id .. ':events' end
local function k_due(q) return P .. 'queue:' .. q .. ':due' end
local function k_wake(q) return P .. 'queue:' .. q .. ':wake' end
local function k_status(s) return P .. 'status:' .. s end
local K_ALL = P .. 'runs'
local K_LEASES = P .. 'leases'
local K_COUNTS = P .. 'counts'
local K_FINISHED = P .. 'finished'
local function k_idem(key) return P .. 'idempotency:' .. key end

local FINISHED = { completed = true, failed = true, cancelled = true }

-- An event's sequence number is its position in the run's list (1-based), so it needs no
-- counter of its own.
local function event(id, kind, stage, data)
  local stage_json = 'null'
  if stage and stage ~= '' then stage_json = cjson.encode(stage) end
  if not data or data == '' then data = '{}' end
  redis.call('RPUSH', k_events(id), '{"at":' .. now .. ',"kind":"' .. kind ..
    '","stage":' .. stage_json .. ',"data":' .. data .. '}')
end

-- Adds to a float field, skipping the command when there is nothing to add.
local function add_cost(key, amount)
  if tonumber(amount) ~= 0 then redis.call('HINCRBYFLOAT', key, 'cost_usd', amount) end
end

local function set_status(id, new)
  local r = k_run(id)
  local v = redis.call('HMGET', r, 'status', 'queue')
  local old, q = v[1], v[2]
  redis.call('HSET', r, 'status', new, 'updated_at', now)
  if old == new then return end
  if old then
    redis.call('ZREM', k_status(old), id)
    redis.call('HINCRBY', K_COUNTS, q .. ':' .. old, -1)
  end
  redis.call('ZADD', k_status(new), 0, id)
  redis.call('HINCRBY', K_COUNTS, q .. ':' .. new, 1)
  if FINISHED[new] then
    redis.call('HSET', r, 'finished_at', now)
    redis.call('ZADD', K_FINISHED, now, id)
  elseif old and FINISHED[old] then
    redis.call('HDEL', r, 'finished_at')
    redis.call('ZREM', K_FINISHED, id)
  end
end

local function release(id)
  redis.call('HDEL', k_run(id), 'lease_owner', 'lease_expires_at')
  redis.call('ZREM', K_LEASES, id)
end

local function enqueue(id, at)
  local q = redis.call('HGET', k_run(id), 'queue')
  redis.call('HSET', k_run(id), 'available_at', at)
  redis.call('ZADD', k_due(q), at, id)
  if at <= now then
    redis.call('LPUSH', k_wake(q), '1')
    redis.call('LTRIM', k_wake(q), 0, 63)
  end
end

local function fenced(id, fence, owner)
  local v = redis.call('HMGET', k_run(id), 'fence', 'lease_owner')
  return v[1] == fence and v[2] == owner
end

local function stage_name(id, idx)
  return redis.call('HGET', k_stage(id, idx), 'name')
end

-- The run hash and its stage hashes, as flat field/value lists ({} when there is no run).
local function snapshot(id)
  local run = redis.call('HGETALL', k_run(id))
  if #run == 0 then return {} end
  local out = { run }
  local n = tonumber(redis.call('HGET', k_run(id), 'stages') or '0')
  for i = 0, n - 1 do out[#out + 1] = redis.call('HGETALL', k_stage(id, i)) end
  return out
end

-- insert id kind name queue inputs mode budget idem idem_ttl_ms n names...
if op == 'insert' then
  local id, kind, name, q, inputs, mode, budget, idem, idem_ttl = ARGV[3], ARGV[4], ARGV[5], ARGV[6], ARGV[7], ARGV[8], ARGV[9], ARGV[10], ARGV[11]
  local n = tonumber(ARGV[12])
  if idem ~= '' then
    local existing = redis.call('GET', k_idem(idem))
    if existing then return { existing, 0 } end
    redis.call('SET', k_idem(idem), id, 'PX', idem_ttl)
  end
  local r = k_run(id)
  redis.call('HSET', r, 'id', id, 'kind', kind, 'name', name, 'queue', q, 'inputs', inputs,
    'provider_mode', mode, 'cost_usd', 0, 'fence', 0, 'cancel_requested', 0,
    'created_at', now, 'updated_at', now, 'stages', n)
  if budget ~= '' then redis.call('HSET', r, 'budget_usd', budget) end
  if idem ~= '' then redis.call('HSET', r, 'idempotency_key', idem) end
  for i = 0, n - 1 do
    redis.call('HSET', k_stage(id, i), 'name', ARGV[13 + i], 'status', 'pending', 'attempts', 0,
      'cost_usd', 0, 'artifacts', '[]')
  end
  redis.call('ZADD', K_ALL, 0, id)
  set_status(id, 'queued')
  enqueue(id, now)
  event(id, 'run_queued', nil, cjson.encode({ queue = q }))
  return { id, 1 }
end

-- claim worker ttl_ms max queues...: up to max due runs, oldest first, as {id, fence, snapshot}
if op == 'claim' then
  local worker, ttl, max = ARGV[3], tonumber(ARGV[4]), tonumber(ARGV[5])
  local claimed = {}
  while #claimed < max do
    local best, best_score = nil, nil
    for i = 6, #ARGV do
      local head = redis.call('ZRANGE', k_due(ARGV[i]), 0, 0, 'WITHSCORES')
      if head[1] and tonumber(head[2]) <= now and (not best_score or tonumber(head[2]) < best_score) then
        best, best_score = { ARGV[i], head[1] }, tonumber(head[2])
      end
    end
    if not best then break end
    local q, id = best[1], best[2]
    redis.call('ZREM', k_due(q), id)
    local r = k_run(id)
    if redis.call('EXISTS', r) == 1 then
      local fence = redis.call('HINCRBY', r, 'fence', 1)
      redis.call('HSET', r, 'lease_owner', worker, 'worker', worker, 'lease_expires_at', now + ttl)
      redis.call('ZADD', K_LEASES, now + ttl, id)
      set_status(id, 'running')
      event(id, 'run_started', nil, cjson.encode({ worker = worker, fence = fence }))
      claimed[#claimed + 1] = { id, fence, snapshot(id) }
    end
  end
  return claimed
end

-- get id
if op == 'get' then
  return snapshot(ARGV[3])
end

-- next_due queues...: milliseconds until the earliest run of these queues is due (-1: none)
if op == 'next_due' then
  local best = nil
  for i = 3, #ARGV do
    local head = redis.call('ZRANGE', k_due(ARGV[i]), 0, 0, 'WITHSCORES')
    if head[1] and (not best or tonumber(head[2]) < best) then best = tonumber(head[2]) end
  end
  if not best then return -1 end
  return math.max(best - now, 0)
end

-- Operations of the lease holder: id fence owner ... ; answer -1 when the fence is stale.
local id, fence, owner = ARGV[3], ARGV[4], ARGV[5]

if op == 'heartbeat' then
  if not fenced(id, fence, owner) then return -1 end
  local ttl = tonumber(ARGV[6])
  redis.call('HSET', k_run(id), 'lease_expires_at', now + ttl)
  redis.call('ZADD', K_LEASES, now + ttl, id)
  return tonumber(redis.call('HGET', k_run(id), 'cancel_requested'))
end

if op == 'start_stage' then
  if not fenced(id, fence, owner) then return -1 end
  local idx = ARGV[6]
  local s = k_stage(id, idx)
  local attempts = redis.call('HINCRBY', s, 'attempts', 1)
  redis.call('HSET', s, 'status', 'running', 'started_at', now)
  redis.call('HDEL', s, 'finished_at', 'error', 'next_attempt_at')
  local name = redis.call('HGET', s, 'name')
  -- The claim made the run 'running'; only the current stage changes.
  redis.call('HSET', k_run(id), 'current_stage', name, 'updated_at', now)
  event(id, 'stage_started', name, '{"attempt":' .. attempts .. '}')
  return attempts
end

-- record_step ... idx key step_json cost done total event_data
if op == 'record_step' then
  if not fenced(id, fence, owner) then return -1 end
  local idx, key, step, cost = ARGV[6], ARGV[7], ARGV[8], ARGV[9]
  if redis.call('HSETNX', k_steps(id), idx .. ':' .. key, step) == 0 then return 0 end
  local s = k_stage(id, idx)
  add_cost(s, cost)
  redis.call('HSET', s, 'progress_done', ARGV[10], 'progress_total', ARGV[11])
  add_cost(k_run(id), cost)
  redis.call('HSET', k_run(id), 'updated_at', now)
  event(id, 'step_completed', redis.call('HGET', s, 'name'), ARGV[12])
  return 1
end

-- commit ... idx output artifacts cost result event_data (result '' when not the last stage)
if op == 'commit' then
  if not fenced(id, fence, owner) then return -1 end
  local idx, output, artifacts, cost, result = ARGV[6], ARGV[7], ARGV[8], ARGV[9], ARGV[10]
  local s = k_stage(id, idx)
  redis.call('HSET', s, 'status', 'completed', 'finished_at', now, 'output', output, 'artifacts', artifacts)
  redis.call('HDEL', s, 'error', 'next_attempt_at')
  add_cost(s, cost)
  add_cost(k_run(id), cost)
  redis.call('HSET', k_run(id), 'updated_at', now)
  event(id, 'stage_completed', redis.call('HGET', s, 'name'), ARGV[11])
  if result ~= '' then
    redis.call('HSET', k_run(id), 'result', result)
    redis.call('HDEL', k_run(id), 'error', 'current_stage')
    release(id)
    set_status(id, 'completed')
    event(id, 'run_completed', nil, '{}')
  end
  return 1
end

-- end_attempt ... idx outcome error delay_ms event_data
if op == 'end_attempt' then
  if not fenced(id, fence, owner) then return -1 end
  local idx, outcome, err, delay = ARGV[6], ARGV[7], ARGV[8], tonumber(ARGV[9])
  local s = k_stage(id, idx)
  local name = redis.call('HGET', s, 'name')
  release(id)
  if outcome == 'retry' then
    redis.call('HSET', s, 'status', 'retrying', 'error', err, 'next_attempt_at', now + delay)
    set_status(id, 'retrying')
    enqueue(id, now + delay)
    event(id, 'retry_scheduled', name, ARGV[10])
  elseif outcome == 'fail' then
    redis.call('HSET', s, 'status', 'failed', 'error', err, 'finished_at', now)
    redis.call('HSET', k_run(id), 'error', err)
    set_status(id, 'failed')
    event(id, 'stage_failed', name, ARGV[10])
    event(id, 'run_failed', nil, ARGV[10])
  elseif outcome == 'cancel' then
    redis.call('HSET', s, 'status', 'cancelled', 'finished_at', now)
    set_status(id, 'cancelled')
    event(id, 'run_cancelled', name, '{}')
  else
    redis.call('HSET', s, 'status', 'pending')
    set_status(id, 'queued')
    enqueue(id, now)
    event(id, 'run_released', name, '{}')
  end
  return 1
end

-- fail_run ... error event_data
if op == 'fail_run' then
  if not fenced(id, fence, owner) then return -1 end
  release(id)
  redis.call('HSET', k_run(id), 'error', ARGV[6])
  set_status(id, 'failed')
  event(id, 'run_failed', nil, ARGV[7])
  return 1
end

-- cancel id: 'cancelled' | 'requested' | 'finished:<status>' | 'missing'
if op == 'cancel' then
  local r = k_run(id)
  local status = redis.call('HGET', r, 'status')
  if not status then return 'missing' end
  if status == 'queued' or status == 'retrying' then
    local q = redis.call('HGET', r, 'queue')
    redis.call('ZREM', k_due(q), id)
    redis.call('HSET', r, 'cancel_requested', 1)
    local n = tonumber(redis.call('HGET', r, 'stages') or '0')
    for i = 0, n - 1 do
      local s = k_stage(id, i)
      if redis.call('HGET', s, 'status') == 'retrying' then
        redis.call('HSET', s, 'status', 'cancelled', 'finished_at', now)
        redis.call('HDEL', s, 'next_attempt_at')
      end
    end
    set_status(id, 'cancelled')
    event(id, 'run_cancelled', nil, '{}')
    return 'cancelled'
  elseif status == 'running' then
    redis.call('HSET', r, 'cancel_requested', 1, 'updated_at', now)
    event(id, 'cancel_requested', nil, '{}')
    return 'requested'
  end
  return 'finished:' .. status
end

-- resume id expected_status from_idx forget_steps(0|1): 'ok' | 'changed' | 'missing'
if op == 'resume' then
  local r = k_run(id)
  local expected, from, forget = ARGV[4], tonumber(ARGV[5]), ARGV[6]
  local status = redis.call('HGET', r, 'status')
  if not status then return 'missing' end
  if status ~= expected then return 'changed' end
  local n = tonumber(redis.call('HGET', r, 'stages') or '0')
  for i = from, n - 1 do
    local s = k_stage(id, i)
    if i == from and forget ~= '1' then
      -- The stage keeps its memoised steps, and with them their cost and progress.
      redis.call('HSET', s, 'status', 'pending', 'attempts', 0)
      redis.call('HDEL', s, 'started_at', 'finished_at', 'output', 'error', 'next_attempt_at')
    else
      redis.call('HSET', s, 'status', 'pending', 'attempts', 0, 'cost_usd', 0, 'artifacts', '[]')
      redis.call('HDEL', s, 'started_at', 'finished_at', 'output', 'error', 'progress_done', 'progress_total', 'next_attempt_at')
    end
    if forget == '1' then
      local fields = redis.call('HKEYS', k_steps(id))
      for _, field in ipairs(fields) do
        if string.sub(field, 1, string.len(i .. ':')) == i .. ':' then redis.call('HDEL', k_steps(id), field) end
      end
    end
  end
  redis.call('HDEL', r, 'result', 'error', 'current_stage', 'lease_owner', 'lease_expires_at')
  redis.call('HSET', r, 'cancel_requested', 0)
  set_status(id, 'queued')
  enqueue(id, now)
  local name = redis.call('HGET', k_stage(id, from), 'name')
  event(id, 'run_resumed', name, cjson.encode({ from_stage = name }))
  return 'ok'
end

-- sweep limit: re-queue (or cancel) runs whose lease expired; answers their ids
if op == 'sweep' then
  local expired = redis.call('ZRANGEBYSCORE', K_LEASES, '-inf', now - 1, 'LIMIT', 0, tonumber(ARGV[3]))
  local recovered = {}
  for _, run_id in ipairs(expired) do
    local r = k_run(run_id)
    local v = redis.call('HMGET', r, 'status', 'lease_expires_at', 'cancel_requested', 'worker')
    redis.call('ZREM', K_LEASES, run_id)
    if v[1] == 'running' and tonumber(v[2] or '0') < now then
      redis.call('HDEL', r, 'lease_owner', 'lease_expires_at')
      if v[3] == '1' then
        set_status(run_id, 'cancelled')
        event(run_id, 'run_cancelled', nil, '{"reason":"lease expired"}')
      else
        set_status(run_id, 'queued')
        enqueue(run_id, now)
        event(run_id, 'lease_recovered', nil, cjson.encode({ previous_worker = v[4] }))
        recovered[#recovered + 1] = run_id
      end
    end
  end
  return recovered
end

-- purge cutoff_ms limit: delete runs finished before the cutoff; answers how many
if op == 'purge' then
  local ids = redis.call('ZRANGEBYSCORE', K_FINISHED, '-inf', ARGV[3], 'LIMIT', 0, tonumber(ARGV[4]))
  for _, run_id in ipairs(ids) do
    local r = k_run(run_id)
    local v = redis.call('HMGET', r, 'status', 'queue', 'stages', 'idempotency_key')
    if v[1] then
      redis.call('ZREM', k_status(v[1]), run_id)
      redis.call('HINCRBY', K_COUNTS, v[2] .. ':' .. v[1], -1)
    end
    for i = 0, tonumber(v[3] or '0') - 1 do redis.call('DEL', k_stage(run_id, i)) end
    if v[4] then redis.call('DEL', k_idem(v[4])) end
    redis.call('DEL', r, k_steps(run_id), k_events(run_id))
    redis.call('ZREM', K_ALL, run_id)
    redis.call('ZREM', K_FINISHED, run_id)
  end
  return #ids
end

return redis.error_reply('unknown operation ' .. tostring(op))
