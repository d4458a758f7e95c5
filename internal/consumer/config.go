package consumer

import (
	"errors"
	"fmt"
	"time"

	"github.com/dlf-stop/worker/internal/command"
)

// Config holds what the processing loop needs. Zero values take the
// defaults of the contract (see setDefaults).
type Config struct {
	StopStream    string // DLF_STOP
	StopSubject   string // dlf.stop.request
	ConsumerName  string // dlf-stop-worker (durable name = consumer name)
	OutcomeStream string // DLF_STOP_OUTCOMES
	OutcomePrefix string // dlf.stop.outcome; events go to <prefix>.<status>
	DeadStream    string // DLF_STOP_DEAD
	DeadSubject   string // dlf.stop.dead
	Replicas      int    // replicas of streams this worker creates

	// Concurrency bounds DLF calls in flight (WORKER_CONCURRENCY).
	Concurrency int
	// CallTimeout bounds one DLF call (DLF_TIMEOUT). The client enforces
	// it too; the loop needs it to size heartbeats and shutdown.
	CallTimeout time.Duration

	RetryInitial    time.Duration // RETRY_INITIAL_INTERVAL
	RetryMax        time.Duration // RETRY_MAX_INTERVAL
	RetryMaxElapsed time.Duration // RETRY_MAX_ELAPSED, from when the command was stored

	// ShortWaitMax is the longest backoff wait kept in-process; longer
	// waits go back to JetStream with NakWithDelay. Default 5s: long enough
	// to absorb a blip without a redelivery round trip, short enough that
	// a waiting command is never near the ack wait.
	ShortWaitMax time.Duration

	// ShutdownTimeout bounds the graceful part of shutdown (SHUTDOWN_TIMEOUT).
	ShutdownTimeout time.Duration

	// AckWait is used only when the worker creates the consumer; an
	// existing consumer keeps its own, which the loop reads and honours.
	AckWait time.Duration

	// Defaults fill project and workspace of commands that have none.
	Defaults command.Defaults

	// WorkerID names this instance in outcome events.
	WorkerID string

	// StateBucket (STATE_BUCKET) keeps per-command state for StateTTL
	// (STATE_TTL): see state.go. DisableState runs without it, which only
	// the benchmark's comparison switch should do.
	StateBucket  string
	StateTTL     time.Duration
	DisableState bool

	// CircuitThreshold is how many calls in a row must fail the same
	// systemic way (no answer, 5xx) before the circuit opens, one instance
	// adding CircuitThreshold-2 at most (see circuit); a 401 or 403 opens
	// it at once. DisableCircuit turns it off (benchmark
	// comparison only).
	CircuitThreshold int
	DisableCircuit   bool

	// RateLimit (DLF_RATE_LIMIT) caps DLF requests per second from this
	// worker, with RateBurst (DLF_RATE_BURST); 0 means unlimited.
	RateLimit float64
	RateBurst int

	// heldFloor replaces minHeld, for tests whose premise is a worker
	// that holds only a few commands (0: minHeld).
	heldFloor int
	// infoEvery replaces consumerInfoEvery, for tests that wait for an
	// edited consumer to be read again (0: consumerInfoEvery).
	infoEvery time.Duration
	// beforeCall, a test's hook, runs right before a call is handed to
	// the client, with its slot (and its probe turn, if probe) taken.
	beforeCall func(probe bool)
}

func (c *Config) setDefaults() {
	setStr := func(p *string, v string) {
		if *p == "" {
			*p = v
		}
	}
	setDur := func(p *time.Duration, v time.Duration) {
		if *p == 0 {
			*p = v
		}
	}
	setStr(&c.StopStream, "DLF_STOP")
	setStr(&c.StopSubject, "dlf.stop.request")
	setStr(&c.ConsumerName, "dlf-stop-worker")
	setStr(&c.OutcomeStream, "DLF_STOP_OUTCOMES")
	setStr(&c.OutcomePrefix, "dlf.stop.outcome")
	setStr(&c.DeadStream, "DLF_STOP_DEAD")
	setStr(&c.DeadSubject, "dlf.stop.dead")
	if c.Replicas == 0 {
		c.Replicas = 1
	}
	if c.Concurrency == 0 {
		c.Concurrency = 32
	}
	setDur(&c.CallTimeout, 10*time.Second)
	setDur(&c.RetryInitial, 500*time.Millisecond)
	setDur(&c.RetryMax, 30*time.Second)
	setDur(&c.RetryMaxElapsed, 10*time.Minute)
	setDur(&c.ShortWaitMax, 5*time.Second)
	setDur(&c.ShutdownTimeout, 20*time.Second)
	setDur(&c.AckWait, 30*time.Second)
	setStr(&c.WorkerID, "worker")
	setStr(&c.StateBucket, "dlf_stop_state")
	setDur(&c.StateTTL, 24*time.Hour)
	if c.CircuitThreshold == 0 {
		c.CircuitThreshold = 5
	}
	if c.RateLimit > 0 && c.RateBurst == 0 {
		c.RateBurst = 1
	}
}

// Validate reports every problem at once.
func (c *Config) Validate() error {
	var errs []error
	positive := func(name string, d time.Duration) {
		if d <= 0 {
			errs = append(errs, fmt.Errorf("%s must be positive, got %s", name, d))
		}
	}
	positive("call timeout", c.CallTimeout)
	positive("retry initial interval", c.RetryInitial)
	positive("retry max interval", c.RetryMax)
	positive("retry max elapsed", c.RetryMaxElapsed)
	positive("short wait max", c.ShortWaitMax)
	positive("shutdown timeout", c.ShutdownTimeout)
	positive("ack wait", c.AckWait)
	if c.RetryMax < c.RetryInitial {
		errs = append(errs, errors.New("retry max interval must not be below the initial interval"))
	}
	if c.Concurrency < 1 {
		errs = append(errs, fmt.Errorf("concurrency must be at least 1, got %d", c.Concurrency))
	}
	positive("state TTL", c.StateTTL)
	if c.RateLimit < 0 || c.RateBurst < 0 {
		errs = append(errs, errors.New("rate limit and burst must not be negative"))
	}
	if c.Replicas < 1 || c.Replicas > 5 {
		errs = append(errs, fmt.Errorf("replicas must be 1 to 5, got %d", c.Replicas))
	}
	return errors.Join(errs...)
}

// maxAckPending is what a consumer this worker creates allows across all
// replicas: room for eight workers each holding minHeld commands, or four
// each holding 4 × WORKER_CONCURRENCY, so that replicas added to a busy
// deployment are not starved.
func (c *Config) maxAckPending() int {
	return max(16*c.Concurrency, 8*minHeld)
}

// heldLimit is how many commands one worker holds at once: reading their
// state, calling, waiting in-process, or publishing. Four times the call
// slots keeps every slot busy while outcomes are being published and
// retries wait. When DLF answers fast, what paces a worker is the round
// trips to JetStream each command makes (its state read, its "sent" mark,
// its outcome and decision record), and those are cheap only in bursts,
// as large as the number of commands at that step. Holding 128 at the
// default concurrency, the state bucket cost 28% of the throughput when DLF
// answers at once; holding 512, about 20% (README, "Performance"). A held
// command costs a few KB and, should the worker die, waits out the ack
// wait.
func (c *Config) heldLimit() int {
	floor := minHeld
	if c.heldFloor > 0 {
		floor = c.heldFloor
	}
	return max(4*c.Concurrency, floor)
}

// minHeld is the fewest commands a worker holds, whatever its concurrency.
const minHeld = 512

// pullBatch is how many messages the client buffers ahead of processing.
func (c *Config) pullBatch() int {
	n := 2 * c.Concurrency
	if n < 16 {
		n = 16
	}
	if n > 512 {
		n = 512
	}
	return n
}
