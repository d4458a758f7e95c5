package consumer

import (
	"os"
	"runtime"
	"slices"
	"strconv"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/dlf-stop/worker/internal/dlf/emulator"
)

// BenchmarkPipeline pushes b.N commands through embedded JetStream, the
// worker and the emulator over HTTP, once with the reliability features
// (state bucket and circuit) and once without, back to back, and reports
// both: commands per second, CPU per command, and the p50/p99 latency from
// publish to stored outcome. Run it with a fixed count so the figures are
// comparable:
//
//	go test -run '^$' -bench BenchmarkPipeline -benchtime 20000x -count 9 ./internal/consumer/
//
// The runs of one measurement are adjacent in time, as the machine's speed
// drifts between runs further apart, and go on, off, off, on (or off, on,
// on, off, alternately): a run measured right after another is measured
// under that one's after-effects (the runtime's memory, the kernel's
// writeback), and the first run of a measurement after a different one,
// so each side has a share of both places. Each side reports the mean of
// its two runs. A short unmeasured pipeline warms the process up first.
func BenchmarkPipeline(b *testing.B) {
	cases := []struct {
		name        string
		latency     time.Duration
		concurrency int
	}{
		{"latency=0/concurrency=32", 0, 32},
		{"latency=50ms/concurrency=256", 50 * time.Millisecond, 256},
	}
	for _, tc := range cases {
		b.Run(tc.name, func(b *testing.B) {
			if b.N < 2 {
				// The framework's first probe, with one command:
				// nothing to measure, and its two environments would
				// only disturb the measurement that follows.
				return
			}
			pipelineWarmUp.Do(func() {
				runPipeline(b, 2000, 0, 32, false)
				runPipeline(b, 2000, 0, 32, true)
			})
			quads[tc.name]++
			first := quads[tc.name]%2 == 0 // plain: reliability off goes first
			var on, off []pipelineResult
			for _, plain := range []bool{first, !first, !first, first} {
				r := runPipeline(b, b.N, tc.latency, tc.concurrency, plain)
				if plain {
					off = append(off, r)
				} else {
					on = append(on, r)
				}
			}
			onM, offM := meanResult(on), meanResult(off)
			b.ReportMetric(onM.rate, "on_cmds/s")
			b.ReportMetric(offM.rate, "off_cmds/s")
			b.ReportMetric(100*onM.rate/offM.rate, "on/off_%")
			b.ReportMetric(onM.cpu, "on_cpu_us/cmd")
			b.ReportMetric(offM.cpu, "off_cpu_us/cmd")
			b.ReportMetric(onM.allocs, "on_allocs/cmd")
			b.ReportMetric(offM.allocs, "off_allocs/cmd")
			b.ReportMetric(onM.p50, "on_p50_ms")
			b.ReportMetric(onM.p99, "on_p99_ms")
			b.ReportMetric(0, "ns/op")
		})
	}
}

// The warm-up runs once per process; quads counts the measurements of
// each case, to alternate which side goes first. Benchmarks run one at a
// time.
var (
	pipelineWarmUp sync.Once
	quads          = map[string]int{}
)

// meanResult averages runs of one side, field by field.
func meanResult(rs []pipelineResult) pipelineResult {
	var m pipelineResult
	for _, r := range rs {
		m.rate += r.rate / float64(len(rs))
		m.cpu += r.cpu / float64(len(rs))
		m.p50 += r.p50 / float64(len(rs))
		m.p99 += r.p99 / float64(len(rs))
		m.allocs += r.allocs / float64(len(rs))
	}
	return m
}

// pipelineResult is what one run of the pipeline measured.
type pipelineResult struct {
	rate     float64 // commands per second
	cpu      float64 // µs of CPU per command, the whole process
	p50, p99 float64 // ms from publish to stored outcome
	// allocs is heap allocations per command, the whole process: steadier
	// still, and most of what garbage collection costs follows it.
	allocs float64
}

// runPipeline runs n commands through a fresh environment; plain turns the
// reliability features off.
func runPipeline(b *testing.B, n int, latency time.Duration, concurrency int, plain bool) pipelineResult {
	// Everything this run starts is gone before the next run starts, and
	// so is its garbage: the other side of a pair must not pay for it.
	sc := &scope{TB: b}
	defer func() {
		sc.close()
		runtime.GC()
	}()
	runtime.GC()
	e := newEnvWith(sc, func(c *Config) {
		c.Concurrency = concurrency
		c.CallTimeout = 10 * time.Second
		c.DisableState = plain
		c.DisableCircuit = plain
	}, emulator.WithRequestLogSize(0))
	e.emu.SetFaults(emulator.Faults{Latency: latency})
	bodies := make([][]byte, n)
	for i := range bodies {
		id := "b-" + strconv.Itoa(i)
		e.emu.AddRunning(proj, "", "s1", id)
		bodies[i] = []byte(`{"command_id":"` + id + `","project_id":"` + proj + `","script_name":"s1","instance_id":"` + id + `"}`)
	}

	// Outcomes are seen on a core subscription: the worker publishes them
	// with a stored-ack, so arrival here follows their storage.
	sent := make([]time.Time, n)
	lat := make([]time.Duration, 0, n)
	var slow []string // ids that took over 10s, to explain a stall
	var mu sync.Mutex
	done := make(chan struct{})
	sub, err := e.nc.Subscribe("dlf.stop.outcome.*", func(m *nats.Msg) {
		id := m.Header.Get(nats.MsgIdHdr)
		i, err := strconv.Atoi(id[2:])
		if err != nil {
			return
		}
		mu.Lock()
		l := time.Since(sent[i])
		lat = append(lat, l)
		if l > 10*time.Second && len(slow) < 5 {
			slow = append(slow, id+" "+string(m.Data))
		}
		if len(lat) == n {
			close(done)
		}
		mu.Unlock()
	})
	if err != nil {
		b.Fatal(err)
	}
	defer sub.Unsubscribe()
	e.startWorker(nil)

	var mem runtime.MemStats
	runtime.ReadMemStats(&mem)
	mallocs0 := mem.Mallocs
	cpu0 := cpuTime()
	start := time.Now()
	for i := 0; i < n; i++ {
		m := nats.NewMsg("dlf.stop.request")
		m.Data = bodies[i]
		mu.Lock()
		sent[i] = time.Now()
		mu.Unlock()
		// Block while 4,000 publishes await their acks rather than fail:
		// the publisher must not outrun the server unboundedly.
		if _, err := e.js.PublishMsgAsync(m, jetstream.WithStallWait(time.Minute)); err != nil {
			b.Fatal(err)
		}
	}
	select {
	case <-done:
	case <-time.After(5 * time.Minute):
		b.Fatalf("only %d of %d outcomes", len(lat), n)
	}
	elapsed := time.Since(start)
	cpu := cpuTime() - cpu0
	runtime.ReadMemStats(&mem)
	mallocs := mem.Mallocs - mallocs0

	mu.Lock()
	slices.Sort(lat)
	p50, p99 := lat[len(lat)/2], lat[len(lat)*99/100]
	mu.Unlock()
	if calls := e.emu.StopCalls(); calls != int64(n) {
		b.Errorf("DLF calls = %d, want %d", calls, n)
	}
	for _, s := range slow {
		b.Logf("slow: %s", s)
	}
	mode := "on"
	if plain {
		mode = "off"
	}
	b.Logf("reliability %s: %d commands in %s: %.0f cmds/s, p50 %s, p99 %s", mode, n, elapsed.Round(time.Millisecond),
		float64(n)/elapsed.Seconds(), p50, p99)
	return pipelineResult{
		rate: float64(n) / elapsed.Seconds(),
		// CPU per command is steadier than throughput on a shared
		// machine; it counts the whole process (server, worker,
		// emulator and publisher).
		cpu:    float64(cpu.Microseconds()) / float64(n),
		p50:    float64(p50.Microseconds()) / 1000,
		p99:    float64(p99.Microseconds()) / 1000,
		allocs: float64(mallocs) / float64(n),
	}
}

// scope is a testing.TB whose cleanups run when close is called rather
// than when the benchmark ends.
type scope struct {
	testing.TB
	fns []func()
}

func (s *scope) Cleanup(f func()) { s.fns = append(s.fns, f) }

// TempDir is removed when close is called too. Left until the benchmark
// ends, the stores of earlier runs (tens of MB each) were written back to
// disk by the kernel while later runs were measured.
func (s *scope) TempDir() string {
	dir, err := os.MkdirTemp("", "bench")
	if err != nil {
		s.Fatal(err)
	}
	s.Cleanup(func() { _ = os.RemoveAll(dir) })
	return dir
}

func (s *scope) close() {
	for i := len(s.fns) - 1; i >= 0; i-- {
		s.fns[i]()
	}
	s.fns = nil
}

// cpuTime is the CPU the whole process has used, user and system.
func cpuTime() time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}
