"""Networks: the Progressive-Distillation UNet (teacher) and DSNO (student) from one backbone."""
from dsno_jax.models.blocks import AttnBlock, ResnetBlock
from dsno_jax.models.build import (count_params, init_student, init_teacher, param_shapes,
                                   student_from_config, student_params_from_teacher,
                                   teacher_from_config)
from dsno_jax.models.gan_head import GANHead
from dsno_jax.models.time_conv import TimeConv
from dsno_jax.models.unet import DSNO, UNet, middle_features
