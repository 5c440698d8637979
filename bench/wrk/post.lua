-- wrk script of the benchmark harness (see bench/README.md).
--
-- Usage: wrk ... -s bench/wrk/post.lua URL -- BODY_FILE [HEADER] [raw]
-- POSTs BODY_FILE as application/json on every request (with HEADER, "Name: value", when given and not
-- empty: wrk's own -H drops a header written without the space), counts the answers by status code, and
-- at the end prints one line "BENCH_JSON {...}" that bench/run parses. Latencies are in
-- microseconds.
--
-- wrk's own latency percentiles are "corrected" for coordinated omission: before printing, wrk adds
-- for every sample longer than twice the mean interval between a connection's requests synthetic
-- samples at that interval below it (stats_correct in wrk 4). They model a sender that keeps
-- sending on a clock, not what any request waited, and one 50 ms stall at 1 ms intervals adds 25
-- samples per connection. With "raw", each request's own time from being handed to wrk to its
-- answer parsed is kept as well and reported under "raw". That needs one connection per thread
-- (`-t C -c C`): request() and response() then alternate, and the clock is read in each.

local threads = {}
local raw = false
local ffi = nil
local now_us = nil

function setup(thread)
   table.insert(threads, thread)
end

function init(args)
   local path = args[1]
   if path == nil then
      error("post.lua: pass the body file after --")
   end
   local file = assert(io.open(path, "rb"))
   wrk.body = file:read("*a")
   file:close()
   wrk.method = "POST"
   wrk.headers["Content-Type"] = "application/json"
   local header = args[2]
   if header ~= nil and header ~= "" then
      local name, value = header:match("^([^:]+):%s*(.*)$")
      if name == nil then
         error("post.lua: a header is Name: value, not " .. header)
      end
      wrk.headers[name] = value
   end
   statuses = {}
   if args[3] == "raw" then
      raw = true
      ffi = require("ffi")
      ffi.cdef [[
         typedef struct { long tv_sec; long tv_nsec; } bench_timespec;
         int clock_gettime(int clock, bench_timespec *ts);
      ]]
      local ts = ffi.new("bench_timespec")
      now_us = function()
         ffi.C.clock_gettime(1, ts) -- CLOCK_MONOTONIC
         return tonumber(ts.tv_sec) * 1e6 + tonumber(ts.tv_nsec) / 1e3
      end
      -- Globals, so that done() can read them from each thread's state.
      waited = {}
      waited_n = 0
      request_sent = nil
      local text = wrk.format()
      -- Defined only here: wrk builds each request through request() when the script has one, and
      -- sends one fixed request otherwise, which costs it less.
      function request()
         request_sent = now_us()
         return text
      end
   end
end

function response(status, headers, body)
   statuses[status] = (statuses[status] or 0) + 1
   if raw and request_sent ~= nil then
      waited_n = waited_n + 1
      waited[waited_n] = now_us() - request_sent
      request_sent = nil
   end
end

-- The raw samples of every thread: count, mean, p50, p90, p99 and max, as a JSON object.
local function raw_summary()
   local all = {}
   for _, thread in ipairs(threads) do
      for _, v in ipairs(thread:get("waited") or {}) do
         all[#all + 1] = v
      end
   end
   if #all == 0 then
      return "null"
   end
   table.sort(all)
   local sum = 0
   for _, v in ipairs(all) do
      sum = sum + v
   end
   local function at(p)
      return all[math.max(1, math.ceil(#all * p / 100))]
   end
   return string.format('{"count":%d,"mean_us":%.1f,"p50_us":%.1f,"p90_us":%.1f,"p99_us":%.1f,' ..
      '"max_us":%.1f}', #all, sum / #all, at(50), at(90), at(99), all[#all])
end

function done(summary, latency, requests)
   local counts = {}
   for _, thread in ipairs(threads) do
      local per_thread = thread:get("statuses") or {}
      for status, n in pairs(per_thread) do
         counts[status] = (counts[status] or 0) + n
      end
   end
   local parts = {}
   for status, n in pairs(counts) do
      table.insert(parts, string.format('"%d":%d', status, n))
   end
   local e = summary.errors
   io.write(string.format(
      'BENCH_JSON {"requests":%d,"duration_s":%.3f,"rps":%.1f,"p50_us":%.1f,"p90_us":%.1f,' ..
      '"p99_us":%.1f,"max_us":%.1f,"mean_us":%.1f,"errors":{"connect":%d,"read":%d,' ..
      '"write":%d,"status":%d,"timeout":%d},"statuses":{%s},"raw":%s}\n',
      summary.requests, summary.duration / 1e6, summary.requests / (summary.duration / 1e6),
      latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max,
      latency.mean, e.connect, e.read, e.write, e.status, e.timeout, table.concat(parts, ","),
      raw_summary()))
end
