package emulator

import (
	"crypto/rand"
	"encoding/hex"
	"net/http"
	"strconv"
	"sync"
	"sync/atomic"
	"time"
)

// DefaultRequestLogSize is how many recent stop requests Requests keeps
// unless WithRequestLogSize says otherwise.
const DefaultRequestLogSize = 10000

// maxRecordedBody bounds the body kept in a Request.
const maxRecordedBody = 4 << 10

// Request is one stop request as the emulator received it.
type Request struct {
	Time       time.Time   // when it arrived (emulator clock)
	Method     string      // e.g. POST
	Path       string      // escaped path as sent (r.URL.EscapedPath())
	RequestURI string      // request target as sent on the request line
	Header     http.Header // every header as received (Host is in r.Host, not here)
	Host       string
	Body       []byte // up to 4 KiB of the body

	// Decoded path segments and the workspace header.
	Project, Script, InstanceID, Workspace string

	RequestID string // X-Request-Id the emulator gave it
	// Status answered; 0 when no answer was sent (Hang, DropAfterStop,
	// Down, Close, or a client that went away).
	Status int
	// Fault names the fault that decided the answer: "" (none), "down",
	// "auth_fail", "auth" (credentials refused), "throttle", "hang",
	// "error", "drop", "closed".
	Fault string
	// Applied is true when this request stopped the instance (also when
	// the answer was then dropped).
	Applied bool
}

// requestLog is a bounded ring of recent stop requests.
type requestLog struct {
	mu   sync.Mutex
	buf  []Request
	next int
	full bool
}

func (l *requestLog) init(n int) {
	if n > 0 {
		l.buf = make([]Request, n)
	}
}

func (l *requestLog) enabled() bool { return len(l.buf) > 0 }

func (l *requestLog) add(r Request) {
	l.mu.Lock()
	l.buf[l.next] = r
	l.next++
	if l.next == len(l.buf) {
		l.next, l.full = 0, true
	}
	l.mu.Unlock()
}

func (l *requestLog) snapshot() []Request {
	l.mu.Lock()
	defer l.mu.Unlock()
	if !l.full {
		return append([]Request(nil), l.buf[:l.next]...)
	}
	out := make([]Request, 0, len(l.buf))
	out = append(out, l.buf[l.next:]...)
	return append(out, l.buf[:l.next]...)
}

// Requests returns the recent stop requests, oldest first. A request is
// recorded when its handling ends, so one still waiting (Latency, Hang) is
// not listed yet.
func (e *Emulator) Requests() []Request {
	if !e.reqLog.enabled() {
		return nil
	}
	return e.reqLog.snapshot()
}

// requestIDs makes X-Request-Id values: 32 lower-case hex digits, a random
// per-emulator prefix and a counter, unique without any lock.
type requestIDs struct {
	prefix [16]byte
	n      atomic.Uint64
}

func (g *requestIDs) init() {
	var b [8]byte
	_, _ = rand.Read(b[:])
	hex.Encode(g.prefix[:], b[:])
}

func (g *requestIDs) next() string {
	var buf [32]byte
	copy(buf[:16], g.prefix[:])
	n := g.n.Add(1)
	digits := strconv.AppendUint(buf[16:16:32], n, 16)
	// Right-align the counter, zero padded.
	pad := 16 - len(digits)
	copy(buf[16+pad:], digits)
	for i := 16; i < 16+pad; i++ {
		buf[i] = '0'
	}
	return string(buf[:])
}
