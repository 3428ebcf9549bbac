-- Stagecraft's run store on Redis: every state change of a run is one operation of this script,
-- so each is atomic, and every worker write checks the run's fencing token in the same call.
--
-- One call carries a batch of operations: ARGV[1] is the key prefix, ARGV[2] 'batch', then for
-- each operation its name, its argument count and its arguments. The answer holds one result per
-- operation, in order. Batching lets many concurrent runs share one call, and the indexes
-- (status sets, counts, leases, wake lists) are written once per call at its end instead of once
-- per run: that is what lets one Redis core serve thousands of runs a second.
--
-- Times come from the Redis server's clock (TIME), so processes on different hosts agree on
-- lease expiry. The work of every operation is bounded: claims look at the head of each queue,
-- sweeps and purges take a limit.

local P = ARGV[1]

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
-- Arguments of redis.call are passed as strings: Redis formats a Lua number with printf on every
-- use, which costs more than the command itself.
local function str(n) return string.format('%d', n) end
local NOW = str(now)

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
-- Wake-list entries kept at most per queue (the list only wakes blocked workers).
local WAKE_CAP = 64

---------------------------------------------------------------------------------------------
-- Index changes of this call, written by flush().

local moved = {}      -- run id -> { queue, status before this call (false: new run), status now }
local moved_ids = {}
local leases = {}     -- run id -> lease expiry, or false when the lease is gone
local lease_ids = {}
local added = {}      -- runs created by this call
local wakes = {}      -- queue -> runs that became due now

-- Records a status change for the status sets, the counts and the finished index.
local function move(id, q, old, new)
  local m = moved[id]
  if not m then
    m = { q, old or false, new }
    moved[id] = m
    moved_ids[#moved_ids + 1] = id
  end
  m[3] = new
end

local function lease(id, expires)
  if leases[id] == nil then lease_ids[#lease_ids + 1] = id end
  leases[id] = expires
end

local function wake(q)
  wakes[q] = (wakes[q] or 0) + 1
end

local function push_to(map, key, ...)
  local list = map[key]
  if not list then
    list = {}
    map[key] = list
  end
  for _, v in ipairs({ ... }) do list[#list + 1] = v end
end

-- Writes the index changes recorded so far, one command per index touched.
local function flush()
  local rem, add, counts = {}, {}, {}
  local fin_add, fin_rem = {}, {}
  for _, id in ipairs(moved_ids) do
    local m = moved[id]
    local q, old, new = m[1], m[2], m[3]
    if old ~= new then
      if old then
        push_to(rem, old, id)
        counts[q .. ':' .. old] = (counts[q .. ':' .. old] or 0) - 1
      end
      push_to(add, new, '0', id)
      counts[q .. ':' .. new] = (counts[q .. ':' .. new] or 0) + 1
      local was, is = old and FINISHED[old], FINISHED[new]
      if is and not was then
        fin_add[#fin_add + 1] = NOW
        fin_add[#fin_add + 1] = id
      elseif was and not is then
        fin_rem[#fin_rem + 1] = id
      end
    end
  end
  for s, ids in pairs(rem) do redis.call('ZREM', k_status(s), unpack(ids)) end
  for s, pairs_ in pairs(add) do redis.call('ZADD', k_status(s), unpack(pairs_)) end
  for key, delta in pairs(counts) do
    if delta ~= 0 then redis.call('HINCRBY', K_COUNTS, key, str(delta)) end
  end
  if #fin_add > 0 then redis.call('ZADD', K_FINISHED, unpack(fin_add)) end
  if #fin_rem > 0 then redis.call('ZREM', K_FINISHED, unpack(fin_rem)) end
  local lease_add, lease_rem = {}, {}
  for _, id in ipairs(lease_ids) do
    local expires = leases[id]
    if expires then
      lease_add[#lease_add + 1] = expires
      lease_add[#lease_add + 1] = id
    else
      lease_rem[#lease_rem + 1] = id
    end
  end
  if #lease_add > 0 then redis.call('ZADD', K_LEASES, unpack(lease_add)) end
  if #lease_rem > 0 then redis.call('ZREM', K_LEASES, unpack(lease_rem)) end
  if #added > 0 then
    local members = {}
    for _, id in ipairs(added) do
      members[#members + 1] = '0'
      members[#members + 1] = id
    end
    redis.call('ZADD', K_ALL, unpack(members))
  end
  for q, n in pairs(wakes) do
    local tokens = {}
    for i = 1, math.min(n, WAKE_CAP) do tokens[i] = '1' end
    redis.call('LPUSH', k_wake(q), unpack(tokens))
    redis.call('LTRIM', k_wake(q), 0, WAKE_CAP - 1)
  end
  moved, moved_ids, leases, lease_ids, added, wakes = {}, {}, {}, {}, {}, {}
end

---------------------------------------------------------------------------------------------
-- Helpers.

-- An event as stored: its sequence number is its position in the run's list (1-based), so it
-- needs no counter of its own.
local function ev(kind, stage, data)
  local stage_json = 'null'
  if stage and stage ~= '' then stage_json = cjson.encode(stage) end
  if not data or data == '' then data = '{}' end
  return '{"at":' .. NOW .. ',"kind":"' .. kind .. '","stage":' .. stage_json .. ',"data":' .. data .. '}'
end

local function push_events(id, ...)
  redis.call('RPUSH', k_events(id), ...)
end

local function event(id, kind, stage, data)
  push_events(id, ev(kind, stage, data))
end

-- Adds to a float field, skipping the command when there is nothing to add.
local function add_cost(key, amount)
  if tonumber(amount) ~= 0 then redis.call('HINCRBYFLOAT', key, 'cost_usd', amount) end
end

-- Sets a run's status where the caller has not read the old one (the cold paths).
local function set_status(id, new)
  local r = k_run(id)
  local v = redis.call('HMGET', r, 'status', 'queue')
  local old, q = v[1], v[2]
  redis.call('HSET', r, 'status', new, 'updated_at', NOW)
  if FINISHED[new] and not (old and FINISHED[old]) then
    redis.call('HSET', r, 'finished_at', NOW)
  elseif old and FINISHED[old] and not FINISHED[new] then
    redis.call('HDEL', r, 'finished_at')
  end
  move(id, q, old, new)
end

local function release(id)
  redis.call('HDEL', k_run(id), 'lease_owner', 'lease_expires_at')
  lease(id, false)
end

local function enqueue(id, at)
  local q = redis.call('HGET', k_run(id), 'queue')
  redis.call('HSET', k_run(id), 'available_at', str(at))
  redis.call('ZADD', k_due(q), str(at), id)
  if at <= now then wake(q) end
end

-- The run's fence and lease owner with `extra` fields after them, or nil when the caller's
-- fence is not the current one.
local function fenced(id, fence, owner, ...)
  local v = redis.call('HMGET', k_run(id), 'fence', 'lease_owner', ...)
  if v[1] == fence and v[2] == owner then return v end
  return nil
end

-- The run hash and its stage hashes, as flat field/value lists ({} when there is no run).
-- `n` is the number of stages when the caller knows it.
local function snapshot(id, n)
  local run = redis.call('HGETALL', k_run(id))
  if #run == 0 then return {} end
  if not n then
    for i = 1, #run, 2 do
      if run[i] == 'stages' then n = tonumber(run[i + 1]) end
    end
  end
  local out = { run }
  for i = 0, (n or 0) - 1 do out[#out + 1] = redis.call('HGETALL', k_stage(id, i)) end
  return out
end

---------------------------------------------------------------------------------------------
-- Operations. Each takes its arguments as a list and answers one value (never nil).

local OPS = {}

-- insert id kind name queue inputs mode budget idem idem_ttl_ms reuse(0|1) n names...
function OPS.insert(a)
  local id, kind, name, q, inputs, mode, budget, idem, idem_ttl = a[1], a[2], a[3], a[4], a[5], a[6], a[7], a[8], a[9]
  local n = tonumber(a[11])
  if idem ~= '' then
    local existing = redis.call('GET', k_idem(idem))
    if existing then return { existing, 0 } end
    redis.call('SET', k_idem(idem), id, 'PX', idem_ttl)
  end
  local fields = { 'id', id, 'kind', kind, 'name', name, 'queue', q, 'inputs', inputs,
    'provider_mode', mode, 'cost_usd', '0', 'fence', '0', 'cancel_requested', '0',
    'created_at', NOW, 'updated_at', NOW, 'stages', a[11], 'status', 'queued', 'available_at', NOW,
    'reuse', a[10] }
  if budget ~= '' then
    fields[#fields + 1] = 'budget_usd'
    fields[#fields + 1] = budget
  end
  if idem ~= '' then
    fields[#fields + 1] = 'idempotency_key'
    fields[#fields + 1] = idem
  end
  redis.call('HSET', k_run(id), unpack(fields))
  for i = 0, n - 1 do
    redis.call('HSET', k_stage(id, i), 'name', a[12 + i], 'status', 'pending', 'attempts', '0',
      'cost_usd', '0', 'artifacts', '[]')
  end
  added[#added + 1] = id
  move(id, q, nil, 'queued')
  redis.call('ZADD', k_due(q), NOW, id)
  wake(q)
  event(id, 'run_queued', nil, cjson.encode({ queue = q }))
  return { id, 1 }
end

-- claim worker ttl_ms max queues...: up to max due runs, oldest first, as {id, fence, stages}
function OPS.claim(a)
  local worker, max = a[1], tonumber(a[3])
  local expires = str(now + tonumber(a[2]))
  local candidates = {}
  for i = 4, #a do
    local head = redis.call('ZRANGEBYSCORE', k_due(a[i]), '-inf', NOW, 'WITHSCORES', 'LIMIT', '0', a[3])
    for j = 1, #head, 2 do
      candidates[#candidates + 1] = { a[i], head[j], tonumber(head[j + 1]) }
    end
  end
  table.sort(candidates, function(x, y)
    if x[3] ~= y[3] then return x[3] < y[3] end
    return x[2] < y[2]
  end)
  local taken = {}
  local claimed = {}
  for i = 1, math.min(max, #candidates) do
    local q, id = candidates[i][1], candidates[i][2]
    push_to(taken, q, id)
    local r = k_run(id)
    local v = redis.call('HMGET', r, 'status', 'fence', 'stages')
    if v[1] then
      local fence = str(tonumber(v[2]) + 1)
      redis.call('HSET', r, 'fence', fence, 'lease_owner', worker, 'worker', worker,
        'lease_expires_at', expires, 'status', 'running', 'updated_at', NOW)
      lease(id, expires)
      move(id, q, v[1], 'running')
      event(id, 'run_started', nil, '{"worker":' .. cjson.encode(worker) .. ',"fence":' .. fence .. '}')
      -- The client reads the run's hashes itself, outside the script: much cheaper for Redis.
      claimed[#claimed + 1] = { id, fence, v[3] }
    end
  end
  for q, ids in pairs(taken) do redis.call('ZREM', k_due(q), unpack(ids)) end
  return claimed
end

-- get id
function OPS.get(a)
  return snapshot(a[1])
end

-- next_due queues...: milliseconds until the earliest run of these queues is due (-1: none)
function OPS.next_due(a)
  local best = nil
  for i = 1, #a do
    local head = redis.call('ZRANGE', k_due(a[i]), 0, 0, 'WITHSCORES')
    if head[1] and (not best or tonumber(head[2]) < best) then best = tonumber(head[2]) end
  end
  if not best then return -1 end
  return math.max(best - now, 0)
end

-- Operations of the lease holder: id fence owner ... ; answer -1 when the fence is stale.

-- heartbeat id fence owner ttl_ms: 1 when a cancel was requested, else 0
function OPS.heartbeat(a)
  local id = a[1]
  local v = fenced(id, a[2], a[3], 'cancel_requested')
  if not v then return -1 end
  local expires = str(now + tonumber(a[4]))
  redis.call('HSET', k_run(id), 'lease_expires_at', expires)
  lease(id, expires)
  return tonumber(v[3])
end

-- start_stage id fence owner idx: the attempt number
function OPS.start_stage(a)
  local id, idx = a[1], a[4]
  if not fenced(id, a[2], a[3]) then return -1 end
  local s = k_stage(id, idx)
  local v = redis.call('HMGET', s, 'name', 'attempts', 'finished_at', 'error', 'next_attempt_at')
  local name, attempts = v[1], tonumber(v[2] or '0') + 1
  redis.call('HSET', s, 'attempts', str(attempts), 'status', 'running', 'started_at', NOW)
  if v[3] or v[4] or v[5] then redis.call('HDEL', s, 'finished_at', 'error', 'next_attempt_at') end
  -- The claim made the run 'running'; only the current stage changes.
  redis.call('HSET', k_run(id), 'current_stage', name, 'updated_at', NOW)
  event(id, 'stage_started', name, '{"attempt":' .. str(attempts) .. '}')
  return attempts
end

-- record_step id fence owner idx key step_json cost done total event_data: 0 when known already
function OPS.record_step(a)
  local id, idx, key, step, cost = a[1], a[4], a[5], a[6], a[7]
  if not fenced(id, a[2], a[3]) then return -1 end
  if redis.call('HSETNX', k_steps(id), idx .. ':' .. key, step) == 0 then return 0 end
  local s = k_stage(id, idx)
  add_cost(s, cost)
  redis.call('HSET', s, 'progress_done', a[8], 'progress_total', a[9])
  add_cost(k_run(id), cost)
  redis.call('HSET', k_run(id), 'updated_at', NOW)
  event(id, 'step_completed', redis.call('HGET', s, 'name'), a[10])
  return 1
end

-- commit id fence owner idx output artifacts cost result event_data reused_from
-- (result '' when not the last stage; the last stage's commit completes the run; reused_from ''
-- unless the checkpoint came from another run)
function OPS.commit(a)
  local id, idx, output, artifacts, cost, result = a[1], a[4], a[5], a[6], a[7], a[8]
  local v = fenced(id, a[2], a[3], 'status', 'queue')
  if not v then return -1 end
  local r, s = k_run(id), k_stage(id, idx)
  local sv = redis.call('HMGET', s, 'name', 'error', 'next_attempt_at')
  local name = sv[1]
  redis.call('HSET', s, 'status', 'completed', 'finished_at', NOW, 'output', output, 'artifacts', artifacts)
  if sv[2] or sv[3] then redis.call('HDEL', s, 'error', 'next_attempt_at') end
  if a[10] ~= '' then redis.call('HSET', s, 'reused_from', a[10]) end
  add_cost(s, cost)
  add_cost(r, cost)
  if result == '' then
    redis.call('HSET', r, 'updated_at', NOW)
    event(id, 'stage_completed', name, a[9])
    return 1
  end
  redis.call('HSET', r, 'result', result, 'status', 'completed', 'updated_at', NOW, 'finished_at', NOW)
  redis.call('HDEL', r, 'error', 'current_stage', 'lease_owner', 'lease_expires_at')
  lease(id, false)
  move(id, v[4], v[3], 'completed')
  push_events(id, ev('stage_completed', name, a[9]), ev('run_completed', nil, '{}'))
  return 1
end

-- end_attempt id fence owner idx outcome error delay_ms event_data
function OPS.end_attempt(a)
  local id, idx, outcome, err, delay = a[1], a[4], a[5], a[6], tonumber(a[7])
  if not fenced(id, a[2], a[3]) then return -1 end
  local s = k_stage(id, idx)
  local name = redis.call('HGET', s, 'name')
  release(id)
  if outcome == 'retry' then
    redis.call('HSET', s, 'status', 'retrying', 'error', err, 'next_attempt_at', str(now + delay))
    set_status(id, 'retrying')
    enqueue(id, now + delay)
    event(id, 'retry_scheduled', name, a[8])
  elseif outcome == 'fail' then
    redis.call('HSET', s, 'status', 'failed', 'error', err, 'finished_at', NOW)
    redis.call('HSET', k_run(id), 'error', err)
    set_status(id, 'failed')
    push_events(id, ev('stage_failed', name, a[8]), ev('run_failed', nil, a[8]))
  elseif outcome == 'cancel' then
    redis.call('HSET', s, 'status', 'cancelled', 'finished_at', NOW)
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

-- fail_run id fence owner error event_data
function OPS.fail_run(a)
  local id = a[1]
  if not fenced(id, a[2], a[3]) then return -1 end
  release(id)
  redis.call('HSET', k_run(id), 'error', a[4])
  set_status(id, 'failed')
  event(id, 'run_failed', nil, a[5])
  return 1
end

-- cancel id: 'cancelled' | 'requested' | 'finished:<status>' | 'missing'
function OPS.cancel(a)
  local id = a[1]
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
        redis.call('HSET', s, 'status', 'cancelled', 'finished_at', NOW)
        redis.call('HDEL', s, 'next_attempt_at')
      end
    end
    set_status(id, 'cancelled')
    event(id, 'run_cancelled', nil, '{}')
    return 'cancelled'
  elseif status == 'running' then
    redis.call('HSET', r, 'cancel_requested', '1', 'updated_at', NOW)
    event(id, 'cancel_requested', nil, '{}')
    return 'requested'
  end
  return 'finished:' .. status
end

-- resume id expected_status from_idx forget_steps(0|1) inputs budget: 'ok' | 'changed' | 'missing'
-- (inputs and budget '' when unchanged)
function OPS.resume(a)
  local id, expected, from, forget = a[1], a[2], tonumber(a[3]), a[4]
  local r = k_run(id)
  local status = redis.call('HGET', r, 'status')
  if not status then return 'missing' end
  if status ~= expected then return 'changed' end
  local n = tonumber(redis.call('HGET', r, 'stages') or '0')
  for i = from, n - 1 do
    local s = k_stage(id, i)
    if i == from and forget ~= '1' then
      -- The stage keeps its memoised steps, and with them their cost and progress.
      redis.call('HSET', s, 'status', 'pending', 'attempts', 0)
      redis.call('HDEL', s, 'started_at', 'finished_at', 'output', 'error', 'next_attempt_at', 'reused_from')
    else
      redis.call('HSET', s, 'status', 'pending', 'attempts', 0, 'cost_usd', 0, 'artifacts', '[]')
      redis.call('HDEL', s, 'started_at', 'finished_at', 'output', 'error', 'progress_done', 'progress_total', 'next_attempt_at', 'reused_from')
    end
    if forget == '1' then
      local fields = redis.call('HKEYS', k_steps(id))
      for _, field in ipairs(fields) do
        if string.sub(field, 1, string.len(i .. ':')) == i .. ':' then redis.call('HDEL', k_steps(id), field) end
      end
    end
  end
  redis.call('HDEL', r, 'result', 'error', 'current_stage', 'lease_owner', 'lease_expires_at')
  redis.call('HSET', r, 'cancel_requested', '0')
  if a[5] ~= '' then redis.call('HSET', r, 'inputs', a[5]) end
  if a[6] ~= '' then redis.call('HSET', r, 'budget_usd', a[6]) end
  lease(id, false)
  set_status(id, 'queued')
  enqueue(id, now)
  local name = redis.call('HGET', k_stage(id, from), 'name')
  event(id, 'run_resumed', name, cjson.encode({ from_stage = name }))
  return 'ok'
end

-- sweep limit: re-queue (or cancel) runs whose lease expired; answers their ids
function OPS.sweep(a)
  flush()
  local expired = redis.call('ZRANGEBYSCORE', K_LEASES, '-inf', str(now - 1), 'LIMIT', '0', a[1])
  local recovered = {}
  for _, run_id in ipairs(expired) do
    local r = k_run(run_id)
    local v = redis.call('HMGET', r, 'status', 'lease_expires_at', 'cancel_requested', 'worker')
    lease(run_id, false)
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
function OPS.purge(a)
  flush()
  local ids = redis.call('ZRANGEBYSCORE', K_FINISHED, '-inf', a[1], 'LIMIT', 0, tonumber(a[2]))
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

---------------------------------------------------------------------------------------------
-- The batch.

if ARGV[2] ~= 'batch' then return redis.error_reply('expected a batch of operations') end
local results = {}
local i = 3
while i <= #ARGV do
  local name, argc = ARGV[i], tonumber(ARGV[i + 1])
  local handler = OPS[name]
  if not handler or not argc then
    flush()
    return redis.error_reply('unknown operation ' .. tostring(name))
  end
  local args = {}
  for j = 1, argc do args[j] = ARGV[i + 1 + j] end
  results[#results + 1] = handler(args)
  i = i + 2 + argc
end
flush()
return results
