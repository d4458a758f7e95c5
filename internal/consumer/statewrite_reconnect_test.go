package consumer

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/dlf-stop/worker/internal/testutil"
)

// cuttingProxy forwards TCP to target. While deaf, what the client sends
// is read and dropped, as bytes in flight are when a connection breaks;
// cut closes every connection, and the client reconnects through it. What
// the server sends reaches the client slow (nanoseconds) late, in order;
// while hold is write-locked, what the client sends is not read at all.
type cuttingProxy struct {
	ln     net.Listener
	target string
	deaf   atomic.Bool
	slow   atomic.Int64
	hold   sync.RWMutex

	mu      sync.Mutex
	conns   []net.Conn
	dropped []byte // what the client sent while deaf
}

func (p *cuttingProxy) serve() {
	for {
		c, err := p.ln.Accept()
		if err != nil {
			return
		}
		s, err := net.Dial("tcp", p.target)
		if err != nil {
			c.Close()
			continue
		}
		p.mu.Lock()
		p.conns = append(p.conns, c, s)
		p.mu.Unlock()
		go p.toClient(c, s)
		go func() {
			buf := make([]byte, 32<<10)
			for {
				p.waitHold()
				n, err := c.Read(buf)
				if n > 0 {
					if p.deaf.Load() {
						p.mu.Lock()
						p.dropped = append(p.dropped, buf[:n]...)
						p.mu.Unlock()
					} else {
						_, _ = s.Write(buf[:n])
					}
				}
				if err != nil {
					s.Close()
					return
				}
			}
		}()
	}
}

// waitHold returns once the test does not hold the proxy's reading.
func (p *cuttingProxy) waitHold() {
	p.hold.RLock()
	//lint:ignore SA2001 the lock is a gate: taking it is the wait
	p.hold.RUnlock()
}

// toClient forwards what the server sends, each read held back by the
// delay set when it was read.
func (p *cuttingProxy) toClient(c, s net.Conn) {
	type chunk struct {
		at time.Time
		b  []byte
	}
	chunks := make(chan chunk, 4096)
	go func() {
		defer close(chunks)
		buf := make([]byte, 32<<10)
		for {
			n, err := s.Read(buf)
			if n > 0 {
				chunks <- chunk{time.Now().Add(time.Duration(p.slow.Load())), bytes.Clone(buf[:n])}
			}
			if err != nil {
				return
			}
		}
	}()
	defer c.Close()
	for k := range chunks {
		if d := time.Until(k.at); d > 0 {
			<-time.After(d)
		}
		if _, err := c.Write(k.b); err != nil {
			s.Close()
			for range chunks { // let the reader end
			}
			return
		}
	}
}

func (p *cuttingProxy) cut() {
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, c := range p.conns {
		c.Close()
	}
	p.conns = nil
}

// proxied is a state writer on a connection through a cuttingProxy, with
// the bucket it writes to and a deadline for the test.
type proxied struct {
	st  *stateStore
	p   *cuttingProxy
	nc  *nats.Conn
	w   *stateWriter
	ctx context.Context
}

func newProxied(t *testing.T) *proxied {
	e := newEnv(t, nil)
	r := &proxied{st: e.state(t)}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	r.p = &cuttingProxy{ln: ln, target: e.srv.Addr().String()}
	go r.p.serve()
	t.Cleanup(func() { ln.Close(); r.p.cut() })
	r.nc, err = nats.Connect("nats://"+ln.Addr().String(), nats.MaxReconnects(-1), nats.ReconnectWait(50*time.Millisecond))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(r.nc.Close)
	r.w, err = newStateWriter(r.nc, "dlf_stop_state")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(r.w.close)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	t.Cleanup(cancel)
	r.ctx = ctx
	return r
}

// A mark that left on a connection which then broke dies with it. No
// stored-ack comes for it, so it fails, and no call goes out unmarked; a
// mark put after the reconnect is stored. (A flush sent after the break
// would have been answered on the new connection.)
func TestMarkLostInAReconnectFails(t *testing.T) {
	t.Parallel()
	r := newProxied(t)
	st, p, nc, w, ctx := r.st, r.p, r.nc, r.w, r.ctx

	p.deaf.Store(true)
	errA := make(chan error, 1)
	go func() { errA <- putAckedErr(w, ctx, "a", []byte("mark-a")) }()
	waitDropped(t, p, "mark-a")
	p.deaf.Store(false)
	p.cut()
	testutil.Eventually(t, 5*time.Second, func() error {
		if nc.Stats().Reconnects == 0 || !nc.IsConnected() {
			return fmt.Errorf("not reconnected yet")
		}
		return nil
	})
	if err := putAckedErr(w, ctx, "b", []byte("mark-b")); err != nil {
		t.Fatalf("a mark put on the new connection: %v", err)
	}
	if _, err := st.kv.Get(ctx, "b"); err != nil {
		t.Fatalf("b reported stored, but it is not (%v)", err)
	}
	select {
	case err := <-errA:
		if err == nil {
			t.Error("the mark died with its connection, yet putAcked reported success")
		}
	case <-time.After(publishTimeout + 2*writeSweep):
		t.Fatal("the lost mark never failed: its caller would wait for good")
	}
	if _, err := st.kv.Get(ctx, "a"); !errors.Is(err, jetstream.ErrKeyNotFound) {
		t.Fatalf("the mark was stored after all (%v): the test did not lose it", err)
	}
}

// holdNextBurst holds w's syncLoop before it takes its next burst: held
// closes once it is held, and letGo (idempotent) lets it on.
func holdNextBurst(t *testing.T, w *stateWriter) (held <-chan struct{}, letGo func()) {
	h, resume := make(chan struct{}), make(chan struct{})
	var once, resumed sync.Once
	letGo = func() { resumed.Do(func() { close(resume) }) }
	t.Cleanup(letGo) // before the writer's close, which waits for syncLoop
	w.beforeBurst = func() { once.Do(func() { close(h); <-resume }) }
	return h, letGo
}

// waitDropped waits until the proxy has swallowed what holds needle.
func waitDropped(t *testing.T, p *cuttingProxy, needle string) {
	t.Helper()
	testutil.Eventually(t, 5*time.Second, func() error {
		p.mu.Lock()
		defer p.mu.Unlock()
		if !bytes.Contains(p.dropped, []byte(needle)) {
			return fmt.Errorf("%q has not left yet", needle)
		}
		return nil
	})
}

// A mark given up while it waits its turn (its caller's deadline passed)
// never goes out: the caller may write the key next, and a late mark
// would overwrite that.
func TestMarkGivenUpIsNeverPublished(t *testing.T) {
	t.Parallel()
	r := newProxied(t)
	st, w, ctx := r.st, r.w, r.ctx

	held, letGo := holdNextBurst(t, w)
	bctx, bcancel := context.WithCancel(ctx)
	errB := make(chan error, 1)
	go func() { errB <- putAckedErr(w, bctx, "b", []byte("mark-b")) }()
	select {
	case <-held:
	case <-time.After(5 * time.Second):
		t.Fatal("the writer never took up the mark")
	}
	testutil.Eventually(t, 5*time.Second, func() error {
		w.syncMu.Lock()
		defer w.syncMu.Unlock()
		if len(w.writes) != 1 {
			return fmt.Errorf("b not queued yet")
		}
		return nil
	})
	bcancel()
	if err := <-errB; !errors.Is(err, context.Canceled) {
		t.Fatalf("b given up: %v", err)
	}
	letGo()
	// c goes out in the burst b would have gone out in, or a later one;
	// the stream stores what it reads in order, so once c is stored, a b
	// sent before it would be too.
	if err := putAckedErr(w, ctx, "c", []byte("mark-c")); err != nil {
		t.Fatal(err)
	}
	if _, err := st.kv.Get(ctx, "b"); !errors.Is(err, jetstream.ErrKeyNotFound) {
		t.Fatalf("b, given up, was published after all (%v)", err)
	}
	w.mu.Lock()
	left := len(w.pending)
	w.mu.Unlock()
	if left != 0 {
		t.Errorf("%d writes still wait for an answer; b's should have been dropped with it", left)
	}
}

// A write the sweeper failed while it was still queued (the publishing
// goroutine stalled) is never sent: its caller was told it failed and may
// write the key next, which a late write would overwrite.
func TestWriteFailedWhileQueuedIsNeverPublished(t *testing.T) {
	t.Parallel()
	r := newProxied(t)
	st, w, ctx := r.st, r.w, r.ctx

	held, letGo := holdNextBurst(t, w)
	failed := make(chan error, 1)
	w.write("late", []byte("late"), 0, 50*time.Millisecond, func(_ uint64, err error) { failed <- err })
	<-held
	select {
	case err := <-failed:
		if err == nil {
			t.Fatal("the write succeeded while its publisher was stalled")
		}
	case <-time.After(5 * writeSweep):
		t.Fatal("the sweeper never failed the queued write")
	}
	letGo()
	if err := putAckedErr(w, ctx, "after", []byte("after")); err != nil {
		t.Fatal(err)
	}
	if _, err := st.kv.Get(ctx, "late"); !errors.Is(err, jetstream.ErrKeyNotFound) {
		t.Fatalf("the write reported failed was stored after all (%v)", err)
	}
}

// A write whose publish stalls (the connection's socket full, the server
// not reading) is not failed by the sweeper while it stalls: it would be
// sent once the socket drains, after its caller was told it failed.
func TestWriteStalledInItsPublishIsNotFailed(t *testing.T) {
	t.Parallel()
	r := newProxied(t)
	p, nc, w := r.p, r.nc, r.w
	p.hold.Lock()
	released := false
	release := func() {
		if !released {
			released = true
			p.hold.Unlock()
		}
	}
	t.Cleanup(release)
	// Fill the socket until a publish blocks: nats.go then holds the
	// connection's lock in its write, and every publish waits for it.
	var publishing atomic.Int64 // when the publish under way began (Unix ns); 0: none
	go func() {
		junk := make([]byte, 256<<10)
		for i := 0; i < 400; i++ {
			publishing.Store(time.Now().UnixNano())
			if nc.Publish("junk", junk) != nil {
				return
			}
			publishing.Store(0)
		}
	}()
	testutil.Eventually(t, 10*time.Second, func() error {
		if at := publishing.Load(); at == 0 || time.Since(time.Unix(0, at)) < 200*time.Millisecond {
			return fmt.Errorf("publishes still go through")
		}
		return nil
	})
	answered := make(chan error, 1)
	w.write("late", []byte("late"), 0, 50*time.Millisecond, func(_ uint64, err error) { answered <- err })
	testutil.Consistently(t, 2*writeSweep+500*time.Millisecond, func() error {
		select {
		case err := <-answered:
			return fmt.Errorf("the write was answered while its publish stalled: %v", err)
		default:
			return nil
		}
	})
	release()
	select {
	case <-answered:
	case <-time.After(30 * time.Second):
		t.Fatal("the write was never answered once the socket drained")
	}
}
