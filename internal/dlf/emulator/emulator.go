package emulator

import (
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"net/http"
	"sync"
	"sync/atomic"
	"time"

	"go.uber.org/zap"
)

// Emulator is an in-process DLF script API. Create it with New, serve it
// with Start, StartOn or Handler, and end it with Close. Every method is
// safe for concurrent use.
type Emulator struct {
	log *zap.Logger
	now func() time.Time

	// options, read by New only
	initAuth   authConfig
	seed       uint64
	seeded     bool
	reqLogSize int

	authMu sync.Mutex // serialises SetCredentials/SetAuthToken
	auth   atomic.Pointer[authConfig]
	faults atomic.Pointer[Faults]

	store     store
	stopCalls atomic.Int64
	reqLog    requestLog
	ids       requestIDs

	rngMu sync.Mutex
	rng   *rand.Rand

	// life: handlers register under lifeMu (read) so Close can wait for
	// them; done is closed by Close and releases every waiting handler.
	lifeMu   sync.RWMutex
	closed   bool
	handlers sync.WaitGroup
	done     chan struct{}

	// listener state, guarded by lnMu
	lnMu      sync.Mutex
	srv       *http.Server
	addr      string        // resolved host:port, kept across Down
	ln        net.Listener  // nil while down
	serveDone chan struct{} // closed when the Serve on ln returns
	srvClosed bool

	connMu sync.Mutex
	conns  map[net.Conn]struct{}
}

// New returns an emulator with no instances and no faults. It listens on
// nothing until Start or StartOn.
func New(opts ...Option) *Emulator {
	e := &Emulator{
		log:        zap.NewNop(),
		now:        time.Now,
		reqLogSize: DefaultRequestLogSize,
		done:       make(chan struct{}),
		conns:      make(map[net.Conn]struct{}),
	}
	for _, o := range opts {
		o(e)
	}
	if !e.seeded {
		e.seed = rand.Uint64()
	}
	e.rng = rand.New(rand.NewPCG(e.seed, e.seed^0x9e3779b97f4a7c15))
	a := e.initAuth
	e.auth.Store(&a)
	e.faults.Store(&Faults{ErrorStatus: defaultErrorStatus})
	e.store.init()
	e.reqLog.init(e.reqLogSize)
	e.ids.init()
	return e
}

// Handler returns the emulator as an http.Handler, for serving it with
// one's own server (e.g. httptest). Faults.Down then closes each request's
// connection instead of the listener.
func (e *Emulator) Handler() http.Handler { return e }

// Start listens on 127.0.0.1 with a free port and serves; it returns the
// base URL, "http://127.0.0.1:PORT".
func (e *Emulator) Start() (string, error) { return e.StartOn("127.0.0.1:0") }

// StartOn listens on addr (host:port; port 0 picks one) and serves; it
// returns the base URL. An emulator starts once.
func (e *Emulator) StartOn(addr string) (string, error) {
	e.lnMu.Lock()
	defer e.lnMu.Unlock()
	if e.srvClosed {
		return "", errors.New("emulator: start: emulator is closed")
	}
	if e.srv != nil {
		return "", errors.New("emulator: start: already started")
	}
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return "", fmt.Errorf("emulator: listen on %s: %w", addr, err)
	}
	e.addr = ln.Addr().String()
	errLog, _ := zap.NewStdLogAt(e.log, zap.DebugLevel) // fails only for levels above Fatal
	e.srv = &http.Server{
		Handler:           e,
		ConnState:         e.trackConn,
		ReadHeaderTimeout: 30 * time.Second,
		ErrorLog:          errLog,
	}
	e.serve(ln)
	if e.faults.Load().Down {
		e.goDownLocked()
	}
	e.log.Info("dlf emulator listening", zap.String("url", e.url()))
	return e.url(), nil
}

// URL returns the base URL once started, else "".
func (e *Emulator) URL() string {
	e.lnMu.Lock()
	defer e.lnMu.Unlock()
	if e.addr == "" {
		return ""
	}
	return e.url()
}

func (e *Emulator) url() string { return "http://" + e.addr }

// serve starts serving ln; lnMu is held.
func (e *Emulator) serve(ln net.Listener) {
	done := make(chan struct{})
	e.ln, e.serveDone = ln, done
	srv := e.srv
	go func() {
		defer close(done)
		_ = srv.Serve(ln) // returns when ln is closed (Down) or on Close
	}()
}

// setDown brings the listener down or back up.
func (e *Emulator) setDown(down bool) {
	e.lnMu.Lock()
	defer e.lnMu.Unlock()
	if e.srv == nil || e.srvClosed {
		return
	}
	switch {
	case down && e.ln != nil:
		e.goDownLocked()
		e.log.Info("dlf emulator down: refusing connections", zap.String("addr", e.addr))
	case !down && e.ln == nil:
		ln, err := net.Listen("tcp", e.addr)
		if err != nil {
			e.log.Error("dlf emulator: listen again failed; staying down", zap.String("addr", e.addr), zap.Error(err))
			return
		}
		e.serve(ln)
		e.log.Info("dlf emulator up again", zap.String("addr", e.addr))
	}
}

// goDownLocked closes the listener, waits for its Serve to return (so no
// connection is accepted afterwards) and closes every open connection.
func (e *Emulator) goDownLocked() {
	_ = e.ln.Close()
	<-e.serveDone
	e.ln = nil
	e.closeConns()
}

// trackConn is the server's ConnState hook: it remembers open connections
// so Down can close them (Close has the server do it).
func (e *Emulator) trackConn(c net.Conn, s http.ConnState) {
	switch s {
	case http.StateNew:
		e.connMu.Lock()
		e.conns[c] = struct{}{}
		e.connMu.Unlock()
	case http.StateHijacked, http.StateClosed:
		e.connMu.Lock()
		delete(e.conns, c)
		e.connMu.Unlock()
	}
}

func (e *Emulator) closeConns() {
	e.connMu.Lock()
	defer e.connMu.Unlock()
	for c := range e.conns {
		_ = c.Close()
		delete(e.conns, c)
	}
}

// Close stops serving: it closes the listener and every connection,
// releases requests waiting in Latency or Hang (their connections are
// closed without an answer) and returns once every handler and server
// goroutine has ended. Afterwards the emulator's state can still be read.
// Close is idempotent.
func (e *Emulator) Close() error {
	e.lifeMu.Lock()
	if e.closed {
		e.lifeMu.Unlock()
		return nil
	}
	e.closed = true
	close(e.done)
	e.lifeMu.Unlock()

	e.lnMu.Lock()
	e.srvClosed = true
	var err error
	if e.srv != nil {
		err = e.srv.Close()
		if e.serveDone != nil {
			<-e.serveDone
		}
		e.ln = nil
	}
	e.lnMu.Unlock()
	e.closeConns()

	e.handlers.Wait()
	if e.srv != nil {
		e.log.Info("dlf emulator closed", zap.String("addr", e.addr))
	}
	return err
}

// enter registers a handler; false once Close has begun.
func (e *Emulator) enter() bool {
	e.lifeMu.RLock()
	defer e.lifeMu.RUnlock()
	if e.closed {
		return false
	}
	e.handlers.Add(1)
	return true
}
