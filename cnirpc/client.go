package cnirpc

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/url"
	"strings"
)

// Errors the client wraps when overlayd does not answer.
var (
	// ErrUnavailable means overlayd could not be reached at all: the
	// socket is missing or refuses connections. The request was not
	// sent.
	ErrUnavailable = errors.New("cnirpc: overlayd unavailable")
	// ErrNoAnswer means the request was sent but no whole answer came
	// back (a timeout, a connection closed early): overlayd may or may
	// not have acted on it.
	ErrNoAnswer = errors.New("cnirpc: no answer from overlayd")
	// errAnswerTooLarge means the answer exceeded maxResponseBytes.
	errAnswerTooLarge = errors.New("answer too large")
)

// maxResponseBytes bounds an answer read from overlayd.
const maxResponseBytes = 1 << 20

// Client talks to overlayd over its socket. It is safe for concurrent
// use. Each call is one HTTP/1.0 exchange on a connection of its own,
// written and read by hand: a CNI plugin makes one call per exec, and
// both an http.Transport and linking net/http into the plugin cost more
// than the exchange itself. HTTP/1.0 makes the server end the body by
// closing the connection, so there is no chunked encoding to read.
type Client struct {
	socket string
}

// NewClient returns a client of the overlayd listening on socket.
func NewClient(socket string) *Client {
	return &Client{socket: socket}
}

// Add asks for the address of r's container interface.
func (c *Client) Add(ctx context.Context, r Request) (Attachment, error) {
	var a Attachment
	err := c.do(ctx, "POST", "add", r, &a)
	return a, err
}

// Check returns the attachment of r's container interface.
func (c *Client) Check(ctx context.Context, r Request) (Attachment, error) {
	var a Attachment
	err := c.do(ctx, "POST", "check", r, &a)
	return a, err
}

// Del releases the address of r's container interface.
func (c *Client) Del(ctx context.Context, r Request) error {
	return c.do(ctx, "POST", "del", r, nil)
}

// GC releases the addresses of network on this host that no attachment
// in valid holds.
func (c *Client) GC(ctx context.Context, r GCRequest) (GCResponse, error) {
	var out GCResponse
	err := c.do(ctx, "POST", "gc", r, &out)
	return out, err
}

// Status returns the health of network on this host.
func (c *Client) Status(ctx context.Context, network string) (Status, error) {
	var st Status
	err := c.do(ctx, "GET", "status?network="+url.QueryEscape(network), nil, &st)
	return st, err
}

func (c *Client) do(ctx context.Context, method, op string, in, out any) error {
	conn, br, err := c.exchange(ctx, method, op, in)
	if err != nil {
		return err
	}
	defer conn.Close()
	data, err := io.ReadAll(br)
	if err == nil && len(data) > maxResponseBytes {
		err = errAnswerTooLarge
	}
	if err != nil {
		return fmt.Errorf("read %s answer: %w: %w", op, ErrNoAnswer, err)
	}
	if out == nil {
		return nil
	}
	if err := json.Unmarshal(data, out); err != nil {
		return &Error{Code: CodeDecodingFailure, Msg: "decode overlayd's " + op + " answer", Details: err.Error()}
	}
	return nil
}

// AddEarly asks for the address of r's container interface, and overlayd
// answers as soon as the address is decided, so that the caller can wire
// the interface while overlayd makes the allocation durable. The caller
// must Wait for the confirmation before it tells anybody the address, and
// Close the Pending in any case.
func (c *Client) AddEarly(ctx context.Context, r Request) (Attachment, *Pending, error) {
	r.Early = true
	conn, br, err := c.exchange(ctx, "POST", "add", r)
	if err != nil {
		return Attachment{}, nil, err
	}
	p := &Pending{conn: conn, dec: json.NewDecoder(br)}
	var a Attachment
	if err := p.dec.Decode(&a); err != nil {
		p.Close()
		return Attachment{}, nil, fmt.Errorf("read add answer: %w: %w", ErrNoAnswer, err)
	}
	if !a.Confirm { // an overlayd that answers only once it is durable
		p.Close()
		p.done = true
	}
	return a, p, nil
}

// Pending is an early ADD answer waiting for its confirmation.
type Pending struct {
	conn io.Closer
	dec  *json.Decoder
	done bool
}

// Wait returns once overlayd confirms the allocation is durable, or with
// its error (an *Error), or with an error wrapping ErrNoAnswer when no
// confirmation came. It closes the connection.
func (p *Pending) Wait() error {
	if p.done {
		return nil
	}
	defer p.Close()
	var conf Confirmation
	if err := p.dec.Decode(&conf); err != nil {
		return fmt.Errorf("read add confirmation: %w: %w", ErrNoAnswer, err)
	}
	if conf.Durable {
		return nil
	}
	if conf.Err == nil || conf.Err.Code == 0 {
		return &Error{Code: CodeInternal, Msg: "overlayd did not confirm the allocation"}
	}
	return conf.Err
}

// Close closes the connection; it may be called more than once.
func (p *Pending) Close() {
	if p.conn != nil {
		p.conn.Close()
		p.conn = nil
	}
}

// exchange sends one request and reads the answer's status and headers.
// A non-200 answer is returned as an *Error. On success the caller reads
// the body from br, then closes conn.
func (c *Client) exchange(ctx context.Context, method, op string, in any) (conn io.ReadWriteCloser, br *bufio.Reader, err error) {
	var body []byte
	if in != nil {
		if body, err = json.Marshal(in); err != nil {
			return nil, nil, fmt.Errorf("encode %s request: %w", op, err)
		}
	}
	conn, err = dial(ctx, c.socket)
	if err != nil {
		return nil, nil, fmt.Errorf("overlayd at %s: %w: %w", c.socket, ErrUnavailable, err)
	}
	fail := func(err error) (io.ReadWriteCloser, *bufio.Reader, error) {
		conn.Close()
		return nil, nil, err
	}
	var reqBuf bytes.Buffer
	fmt.Fprintf(&reqBuf, "%s /%s/%s HTTP/1.0\r\nHost: overlayd\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n",
		method, Version, op, len(body))
	reqBuf.Write(body)
	if _, err := conn.Write(reqBuf.Bytes()); err != nil {
		return fail(fmt.Errorf("send %s to overlayd at %s: %w: %w", op, c.socket, ErrNoAnswer, err))
	}
	br = bufio.NewReader(io.LimitReader(conn, maxResponseBytes+1))
	status, err := readHead(br)
	if err != nil {
		return fail(fmt.Errorf("read %s answer: %w: %w", op, ErrNoAnswer, err))
	}
	if status != "200" {
		data, _ := io.ReadAll(br)
		e := &Error{}
		if json.Unmarshal(data, e) != nil || e.Code == 0 {
			e = &Error{Code: CodeInternal, Msg: fmt.Sprintf("overlayd answered %s to %s", status, op), Details: string(bytes.TrimSpace(data))}
		}
		return fail(e)
	}
	return conn, br, nil
}

// readHead reads the status line and headers of an HTTP/1.0 response,
// whose body ends with the connection, and returns the status code.
func readHead(r *bufio.Reader) (status string, err error) {
	line, err := r.ReadString('\n')
	if err != nil {
		return "", fmt.Errorf("status line: %w", err)
	}
	proto, rest, _ := strings.Cut(strings.TrimRight(line, "\r\n"), " ")
	status, _, _ = strings.Cut(rest, " ")
	if !strings.HasPrefix(proto, "HTTP/1.") || len(status) != 3 {
		return "", fmt.Errorf("not an HTTP response: %q", line)
	}
	for {
		h, err := r.ReadString('\n')
		if err != nil {
			return "", fmt.Errorf("headers: %w", err)
		}
		if h == "\r\n" || h == "\n" {
			return status, nil
		}
	}
}
