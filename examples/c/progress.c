/* progress: encodes test video with vaeencode and prints the encoder's
 * "vaeencode-progress" messages as they arrive.
 *
 *   progress MODEL [FRAMES]
 *
 * Exits 0 at the end of the stream, 1 on an error (printed with its debug
 * text), 2 on bad arguments. Build: see examples/meson.build, or
 *   gcc progress.c -o progress $(pkg-config --cflags --libs gstreamer-1.0) */
#include <gst/gst.h>
#include <stdio.h>
#include <stdlib.h>

int main(int argc, char** argv) {
  gst_init(&argc, &argv);
  if (argc < 2 || argc > 3) {
    fprintf(stderr, "usage: %s MODEL [FRAMES]\n", argv[0]);
    return 2;
  }
  const long frames = argc == 3 ? strtol(argv[2], NULL, 10) : 16;
  if (frames < 1) {
    fprintf(stderr, "FRAMES must be a positive number\n");
    return 2;
  }

  /* The model path is quoted, so that it may hold spaces. */
  gchar* model = g_strescape(argv[1], NULL);
  gchar* description = g_strdup_printf(
      "videotestsrc num-buffers=%ld ! video/x-raw,format=RGB,width=64,height=64 ! "
      "vaeencode model=\"%s\" per-batch=4 ! fakesink",
      frames, model);
  GError* error = NULL;
  GstElement* pipeline = gst_parse_launch(description, &error);
  g_free(description);
  g_free(model);
  if (error) { /* e.g. no vaeencode element: is GST_PLUGIN_PATH set? */
    fprintf(stderr, "could not build the pipeline: %s\n", error->message);
    g_clear_error(&error);
    if (pipeline) gst_object_unref(pipeline);
    return 1;
  }

  int status = 1;
  gst_element_set_state(pipeline, GST_STATE_PLAYING);
  GstBus* bus = gst_element_get_bus(pipeline);
  for (gboolean done = FALSE; !done;) {
    GstMessage* msg = gst_bus_timed_pop_filtered(
        bus, GST_CLOCK_TIME_NONE, GST_MESSAGE_ELEMENT | GST_MESSAGE_EOS | GST_MESSAGE_ERROR);
    switch (GST_MESSAGE_TYPE(msg)) {
      case GST_MESSAGE_ELEMENT: {
        /* frames: latents produced so far; fps: speed of the last batch. */
        const GstStructure* s = gst_message_get_structure(msg);
        guint64 done_frames = 0;
        gdouble fps = 0.0, average = 0.0;
        if (gst_structure_has_name(s, "vaeencode-progress") &&
            gst_structure_get_uint64(s, "frames", &done_frames) && gst_structure_get_double(s, "fps", &fps)) {
          gst_structure_get_double(s, "average-fps", &average);
          printf("progress: %" G_GUINT64_FORMAT " frames, %.1f frames/s (average %.1f)\n", done_frames, fps,
                 average);
          fflush(stdout);
        }
        break;
      }
      case GST_MESSAGE_EOS:
        printf("done\n");
        status = 0;
        done = TRUE;
        break;
      case GST_MESSAGE_ERROR: {
        gchar* debug = NULL;
        gst_message_parse_error(msg, &error, &debug);
        fprintf(stderr, "error from %s: %s\n%s\n", GST_OBJECT_NAME(GST_MESSAGE_SRC(msg)), error->message,
                debug ? debug : "");
        g_clear_error(&error);
        g_free(debug);
        done = TRUE;
        break;
      }
      default:
        break;
    }
    gst_message_unref(msg);
  }

  gst_element_set_state(pipeline, GST_STATE_NULL);
  gst_object_unref(bus);
  gst_object_unref(pipeline);
  return status;
}
