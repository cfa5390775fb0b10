-- wrk script for the task API: one scenario per run, chosen by the first argument.
--
--   wrk ... -s bench/wrk/tasks.lua URL -- SCENARIO IDS_FILE RUNNING_FILE [PATH]
--
-- SCENARIO: create | get | update | list | stats | mix | path
--   get    GET /tasks/{id} over every loaded id
--   update PATCH {"status":"running","progress":N} over the tasks loaded as running,
--          so every update is valid for both apps (no task is ever finished)
--   mix    20% create, 40% update, 30% get, 5% list, 5% stats
--   path   GET PATH (a fixed URL path; for latency at one connection)
-- With BENCH_API_KEY set, every request sends it (Authorization: Bearer).
-- On completion it prints one line "BENCH {json}" with the counts and latencies
-- (microseconds) and, when a response was not 2xx, "BENCH_SAMPLE ..." with the first one.

local threads = {}

function setup(thread)
   thread:set("thread_no", #threads + 1)
   table.insert(threads, thread)
end

local scenario, fixed_path
local ids, running = {}, {}
local counter = 0
non2xx = 0
first_bad = ""

-- BENCH_API_KEY in the environment: every request carries it as a bearer token.
local key = os.getenv("BENCH_API_KEY")
local headers = {}
local json_headers = { ["Content-Type"] = "application/json" }
if key ~= nil and key ~= "" then
   headers["Authorization"] = "Bearer " .. key
   json_headers["Authorization"] = "Bearer " .. key
end

local function read_lines(path)
   local lines = {}
   if path == nil or path == "" then return lines end
   local f = assert(io.open(path, "r"))
   for line in f:lines() do
      if line ~= "" then table.insert(lines, line) end
   end
   f:close()
   return lines
end

function init(args)
   scenario = args[1]
   ids = read_lines(args[2])
   running = read_lines(args[3])
   fixed_path = args[4]
   math.randomseed(os.time() * 100 + (thread_no or 0))
end

local function create()
   counter = counter + 1
   local body = '{"task_type":"bench","params":{"file_path":"/data/bench.pdf","n":' .. counter .. '}}'
   return wrk.format("POST", "/tasks/", json_headers, body)
end

local function get()
   return wrk.format("GET", "/tasks/" .. ids[math.random(#ids)], headers)
end

local function update()
   -- A fresh value almost always differs from the current one, so almost every update appends an event.
   local progress = string.format("%.1f", math.random() * 99)
   local body = '{"status":"running","progress":' .. progress .. '}'
   return wrk.format("PATCH", "/tasks/" .. running[math.random(#running)], json_headers, body)
end

local function list()
   return wrk.format("GET", "/tasks/?status=pending&limit=100", headers)
end

local function stats()
   return wrk.format("GET", "/tasks/stats/summary", headers)
end

local function mix()
   local r = math.random(100)
   if r <= 20 then return create()
   elseif r <= 60 then return update()
   elseif r <= 90 then return get()
   elseif r <= 95 then return list()
   else return stats() end
end

local scenarios = {
   create = create, get = get, update = update, list = list, stats = stats, mix = mix,
   path = function() return wrk.format("GET", fixed_path, headers) end,
}

function request()
   return scenarios[scenario]()
end

function response(status, headers, body)
   if status < 200 or status > 299 then
      non2xx = non2xx + 1
      if first_bad == "" then
         first_bad = status .. " " .. string.sub(body or "", 1, 300):gsub("[\r\n]", " ")
      end
   end
end

function done(summary, latency, requests)
   local bad, sample = 0, ""
   for _, thread in ipairs(threads) do
      bad = bad + (thread:get("non2xx") or 0)
      local s = thread:get("first_bad")
      if sample == "" and s ~= nil then sample = s end
   end
   local e = summary.errors
   io.write(string.format(
      'BENCH {"requests": %d, "duration_us": %d, "mean_us": %.1f, "p50_us": %d, "p90_us": %d, "p99_us": %d, '
         .. '"max_us": %d, "non2xx": %d, "connect_errors": %d, "read_errors": %d, "write_errors": %d, '
         .. '"timeouts": %d}\n',
      summary.requests, summary.duration, latency.mean, latency:percentile(50), latency:percentile(90),
      latency:percentile(99), latency.max, bad, e.connect, e.read, e.write, e.timeout))
   if sample ~= "" then io.write("BENCH_SAMPLE " .. sample .. "\n") end
end
