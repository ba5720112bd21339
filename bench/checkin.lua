-- wrk script: replays pre-signed empty check-ins, one per device, round-robin.
--
--   wrk -t2 -c64 -d15s --latency -s bench/checkin.lua URL -- REQUESTS
--
-- REQUESTS (written by bench/checkin.py): line 1 the path, line 2 the body, then one line
-- per device: header TAB value TAB header TAB value ... (the headers that prove its
-- identity, as SimFleet.auth_headers made them)
-- Each thread starts at its own offset in the list. Every response that is not 200 is
-- counted (by status) and reported by done() on one line starting with "WRKJSON ".

local threads = {}
local counter = 0

function setup(thread)
   counter = counter + 1
   thread:set("tid", counter)
   table.insert(threads, thread)
end

local reqs = {}
local n = 0
local i = 0
non200 = 0
statuses = {}

function init(args)
   local path, body
   for line in io.lines(args[1]) do
      if path == nil then
         path = line
      elseif body == nil then
         body = line
      else
         local headers = { ["Content-Type"] = "application/json" }
         local key
         for field in string.gmatch(line, "[^\t]+") do
            if key == nil then
               key = field
            else
               headers[key] = field
               key = nil
            end
         end
         n = n + 1
         reqs[n] = wrk.format("POST", path, headers, body)
      end
   end
   local nthreads = tonumber(args[2]) or 1
   i = math.floor((tid - 1) * n / nthreads)
end

function request()
   i = i % n + 1
   return reqs[i]
end

function response(status, headers, body)
   if status ~= 200 then
      non200 = non200 + 1
      local key = tostring(status)
      statuses[key] = (statuses[key] or 0) + 1
   end
end

function done(summary, latency, requests)
   local bad = 0
   local counts = {}
   for _, t in ipairs(threads) do
      bad = bad + t:get("non200")
      for k, v in pairs(t:get("statuses")) do
         counts[k] = (counts[k] or 0) + v
      end
   end
   local by_status = {}
   for k, v in pairs(counts) do
      by_status[#by_status + 1] = string.format('"%s": %d', k, v)
   end
   local e = summary.errors
   io.write(string.format(
      'WRKJSON {"requests": %d, "duration_us": %d, "bytes": %d, '
         .. '"errors": {"connect": %d, "read": %d, "write": %d, "status": %d, "timeout": %d}, '
         .. '"non200": %d, "non200_by_status": {%s}, '
         .. '"latency_us": {"mean": %.1f, "p50": %d, "p90": %d, "p99": %d, "max": %d}}\n',
      summary.requests, summary.duration, summary.bytes,
      e.connect, e.read, e.write, e.status, e.timeout,
      bad, table.concat(by_status, ", "),
      latency.mean, latency:percentile(50), latency:percentile(90),
      latency:percentile(99), latency.max))
end
