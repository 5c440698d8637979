-- wrk script of the benchmark harness (see bench/README.md).
--
-- Usage: wrk ... -s bench/wrk/post.lua URL -- BODY_FILE [HEADER]
-- POSTs BODY_FILE as application/json on every request (with HEADER, "Name: value", when given and not
-- empty: wrk's own -H drops a header written without the space), counts the answers by status code, and
-- at the end prints one line "BENCH_JSON {...}" that bench/run parses. Latencies are in
-- microseconds, as wrk measures them.

local threads = {}

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
end

function response(status, headers, body)
   statuses[status] = (statuses[status] or 0) + 1
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
      '"write":%d,"status":%d,"timeout":%d},"statuses":{%s}}\n',
      summary.requests, summary.duration / 1e6, summary.requests / (summary.duration / 1e6),
      latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max,
      latency.mean, e.connect, e.read, e.write, e.status, e.timeout, table.concat(parts, ",")))
end
